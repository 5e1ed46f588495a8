//! Real Mailman 3.3.10 (from PyPI) under qslice: qslice-runners supervising qslice's own
//! Mailman 3 slice runner, a real coordinator, and posts enqueued through Mailman's own
//! Switchboard faster than they are drained. Each post is counted by its ACCEPT lines in
//! Mailman's log; shunt/ and bad/ are counted too. These tests need PyPI (the venv is
//! built once per target dir) and never skip.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use qslice_tests::cluster::holdings;
use qslice_tests::mailman3::{Report, Site};
use qslice_tests::pids_with_env;
use qslice_tests::testcluster::{Ready, TestCluster};
use qslice_tests::wait_for_async;

/// Generous bound for anything a loaded two-core machine does in seconds normally.
const LONG: Duration = Duration::from_secs(120);
/// The runners' lease TTL (tests/src/cluster.rs starts them with 2 s).
const TTL: f64 = 2.0;

struct Cluster {
    // Field order is drop order: the posters stop, then the cluster.
    site: Site,
    tc: TestCluster,
}

/// etcd, a coordinator, queue `in` with `slices` slices, and one qslice-runner per node
/// supervising `in` on a fresh site; `extra` is added to every runner's `[supervise.in]`.
/// Returns once every slice is claimed.
async fn cluster(nodes: &[&str], slices: u32, extra: &str) -> Cluster {
    let site = Site::new().expect("a Mailman 3 site");
    let mut builder = TestCluster::builder().spool(site.spool.clone()).queue("in", slices).coordinators(1);
    for node in nodes {
        let cfg = site.runner_config(&format!("{node}.toml"), extra).expect("config");
        builder = builder.runner_with(node, &["--config", &cfg], &[]);
    }
    let tc = builder.ready(Ready::Claimed).ready_timeout(LONG).start().await.expect("cluster");
    Cluster { site, tc }
}

impl Cluster {
    /// Runs qslicectl against the coordinator; it must succeed.
    fn ctl(&self, args: &[&str]) -> String {
        qslice_tests::qslicectl(&self.tc.coordinator("c1").admin, "60s", args)
    }

    async fn holds(&self, node: &str) -> Vec<u32> {
        self.tc.holdings("in").await.remove(node).unwrap_or_default()
    }

    /// Waits until posting is done and every one of `posts` posts was accepted with the
    /// queue empty, then returns the report.
    async fn all_accepted(&mut self, posts: usize) -> Report {
        wait_for_async(LONG, "posting done", || {
            let done = self.site.posting_done();
            async move { done }
        })
        .await
        .expect("posted");
        self.site.all_accepted(posts, LONG).await.unwrap_or_else(|e| panic!("{e}; runner logs:\n{}", self.logs()))
    }

    /// Waits until every node's log says `n` warm spares got ready (Mailman initialised).
    async fn warm_spares(&self, n: usize) {
        for (node, runner) in self.tc.runners() {
            wait_for_async(LONG, &format!("{node}'s {n} warm spares ready"), || {
                let ready = runner.log().matches("a warm Mailman slice runner is ready").count();
                async move { ready >= n }
            })
            .await
            .expect("spares");
        }
    }

    fn logs(&self) -> String {
        self.tc.runners().keys().map(|n| format!("--- {n}\n{}\n", qslice_tests::tail(&self.site.spool.scratch(&format!("{n}.log")), 40))).collect()
    }
}

/// Every post accepted exactly once, nothing shunted, nothing in bad/.
fn assert_each_post_once(report: &Report, posts: usize) {
    assert_eq!(report.accepts.len(), posts, "posts accepted");
    assert!(report.doubled().is_empty(), "posts accepted twice: {:?}", report.doubled());
    assert_eq!(report.shunt, 0, "shunted posts");
    assert_eq!(report.bad, 0, "posts in bad/");
    assert_eq!(report.errors, 0, "skipped or shunted messages in Mailman's error log");
}

/// The number in a post's Message-ID `<qslice-N@example.com>`.
fn post_number(id: &str) -> Option<usize> {
    id.strip_prefix("<qslice-")?.split('@').next()?.parse().ok()
}

async fn wait_for_accepts(site: &Site, at_least: usize) {
    wait_for_async(LONG, "posts being accepted", || {
        let n = site.report().map(|r| r.accepts.len()).unwrap_or(0);
        async move { n >= at_least }
    })
    .await
    .expect("accepting");
}

#[tokio::test]
async fn drains_and_rebalances_accept_every_post_once_with_nothing_shunted() {
    let mut c = cluster(&["r1", "r2", "r3"], 4, "").await;
    // A backlog, and posts arriving faster than four slice runners on two cores drain.
    c.site.post(150, 0).expect("post");
    c.site.post_in_background(250, 150, 40.0).expect("post");
    wait_for_accepts(&c.site, 20).await;
    for node in ["r1", "r2"] {
        c.ctl(&["drain", node]);
        assert!(c.holds(node).await.is_empty(), "{node} drained");
        c.ctl(&["uncordon", node]);
        wait_for_async(LONG, "the uncordoned node takes slices again (rebalance)", || {
            let c = &c;
            async move { !c.holds(node).await.is_empty() }
        })
        .await
        .expect("rebalanced");
    }
    let report = c.all_accepted(400).await;
    assert_each_post_once(&report, 400);
    assert!(report.runners.len() > 4, "slices moved between nodes: {:?}", report.runners);
}

/// The Mailman processes of `node` of the site `site` (its fork servers and slice runners,
/// which run the script from the node's state dir): pid -> (parent pid, command line).
fn mailman_processes(site: &Site, node: &str) -> BTreeMap<u32, (u32, String)> {
    let script = site.spool.scratch(&format!("state-{node}")).join("qslice_mailman3.py").display().to_string();
    pids_with_env(&format!("QSLICE_NODE={node}"))
        .into_iter()
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid = stat.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok()?;
            cmdline.contains(&script).then_some((pid, (ppid, cmdline)))
        })
        .collect()
}

#[tokio::test]
async fn slice_runners_fork_from_one_initialised_process_per_queue_and_die_with_their_runner() {
    // r1 forks its slice runners (the default), r2 starts each on its own.
    let site = Site::new().expect("a Mailman 3 site");
    let mut builder = TestCluster::builder().spool(site.spool.clone()).queue("in", 4).coordinators(1);
    for (node, extra) in [("r1", "spares = 2\n"), ("r2", "spares = 2\nfork_server = false\n")] {
        let cfg = site.runner_config(&format!("{node}.toml"), extra).expect("config");
        builder = builder.runner_with(node, &["--config", &cfg], &[]);
    }
    let tc = builder.ready(Ready::Claimed).ready_timeout(LONG).start().await.expect("cluster");
    let mut c = Cluster { site, tc };
    c.warm_spares(2).await;
    c.site.post(40, 0).expect("post");
    let report = c.all_accepted(40).await;
    assert_each_post_once(&report, 40);
    let served: BTreeSet<String> = report.accepts.values().flatten().filter_map(|a| report.runner_of(a)).map(|r| r.node.clone()).collect();
    assert_eq!(served, BTreeSet::from(["r1".to_owned(), "r2".to_owned()]), "both nodes accepted posts");

    let (r1_slices, r2_slices) = (c.holds("r1").await.len(), c.holds("r2").await.len());
    let r1 = mailman_processes(&c.site, "r1");
    // A forked child keeps its server's command line; the server is r1's own child.
    let r1_pid = c.tc.runners()["r1"].pid().expect("r1 runs");
    let servers: Vec<u32> = r1.iter().filter(|(_, (ppid, cmd))| *ppid == r1_pid && cmd.contains("--fork-server")).map(|(pid, _)| *pid).collect();
    assert_eq!(servers.len(), 1, "one fork server for r1's one queue: {r1:?}");
    let forked = r1.iter().filter(|(_, (ppid, _))| *ppid == servers[0]).count();
    assert_eq!(forked + 1, r1.len(), "every other Mailman process of r1 is a child of its fork server: {r1:?}");
    assert!(forked >= r1_slices + 2, "r1's {r1_slices} slices and 2 spares are forked: {r1:?}");
    let r2 = mailman_processes(&c.site, "r2");
    let r2_pid = c.tc.runners()["r2"].pid().expect("r2 runs");
    assert!(r2.values().all(|(ppid, cmd)| *ppid == r2_pid && !cmd.contains("--fork-server")), "r2 starts each slice runner itself: {r2:?}");
    assert!(r2.len() >= r2_slices + 2, "r2's {r2_slices} slices and 2 spares run: {r2:?}");

    // kill -9 of a forking runner takes its fork server and every forked child with it.
    c.tc.runner_mut("r1").kill();
    wait_for_async(LONG, "r1's Mailman processes gone", || async { mailman_processes(&c.site, "r1").is_empty() }).await.expect("gone with r1");
}

#[tokio::test]
async fn a_killed_runners_slices_process_again_within_the_ttl_and_only_its_in_flight_posts_may_double() {
    let mut c = cluster(&["r1", "r2", "r3"], 4, "spares = 2\n").await;
    // A takeover is warm once each node's spares have initialised Mailman.
    c.warm_spares(2).await;
    c.site.post(100, 0).expect("post");
    c.site.post_in_background(300, 100, 40.0).expect("post");
    // The kill comes once the background poster's posts are being accepted: each orphaned
    // slice then has posts arriving or waiting at the takeover, and its first ACCEPT after
    // the kill measures its idle time. (A poster slow to start under load once left a
    // slice its old owner had emptied with nothing to accept for 4 s.)
    wait_for_async(LONG, "the background poster's posts being accepted", || {
        let started = c.site.report().map(|r| r.accepts.keys().any(|id| post_number(id) >= Some(100))).unwrap_or(false);
        async move { started }
    })
    .await
    .expect("background posts accepted");
    // The victim is the node holding the most slices.
    let held = holdings(&mut c.tc.client(), "t", "in").await;
    let (victim, orphaned) = held.iter().max_by_key(|(_, s)| s.len()).map(|(n, s)| (n.clone(), s.iter().copied().collect::<BTreeSet<u32>>())).expect("a holder");
    let victim = victim.as_str();
    assert!(!orphaned.is_empty(), "{victim} holds slices");
    let killed_at = unix_now();
    c.tc.runner_mut(victim).kill();
    // Each orphaned slice's first ACCEPT by another node's slice runner.
    let mut first: BTreeMap<u32, f64> = BTreeMap::new();
    wait_for_async(LONG, "every orphaned slice accepting on another node", || {
        let r = c.site.report().expect("report");
        for accept in r.accepts.values().flatten().filter(|a| a.0 > killed_at) {
            if let Some(runner) = r.runner_of(accept).filter(|run| run.node != victim && orphaned.contains(&run.slice) && run.count == 4) {
                let t = first.entry(runner.slice).or_insert(accept.0);
                *t = t.min(accept.0);
            }
        }
        let done = first.len() == orphaned.len();
        async move { done }
    })
    .await
    .expect("taken over");
    let delays: Vec<f64> = first.values().map(|t| t - killed_at).collect();
    println!("kill -9 of {victim} at {killed_at:.3} -> first ACCEPT of each orphaned slice on another node (TTL {TTL} s): {delays:.3?} s");
    for (node, p) in c.tc.runners() {
        let log = p.log();
        let takeover: Vec<&str> = log.lines().filter(|l| l.contains("claimed slice") || l.contains("handed the slice") || l.contains("is running the slice")).collect();
        println!("--- {node}\n{}", takeover.join("\n"));
    }
    let report = c.all_accepted(400).await;
    assert_eq!(report.accepts.len(), 400, "every post accepted");
    assert_eq!(report.shunt, 0, "shunted posts");
    assert_eq!(report.bad, 0, "posts in bad/");
    // A post may be accepted twice only if the killed node's runner accepted it (in
    // flight at the kill) and its slice's next owner recovered it: at most one per slice.
    let doubled = report.doubled();
    assert!(doubled.len() <= orphaned.len(), "more doubles than orphaned slices: {doubled:?}");
    for (id, n) in &doubled {
        let accepts = &report.accepts[*id];
        let first_run = report.runner_of(&accepts[0]).expect("runner of the first ACCEPT");
        assert!(*n == 2 && first_run.node == victim && accepts[0].0 <= killed_at, "{id} accepted {n} times, first by {first_run:?}");
    }
    for (slice, delay) in first.keys().zip(&delays) {
        assert!(*delay <= TTL + 1.0, "slice {slice} idle {delay:.2} s after the kill, beyond TTL + 1 s");
    }
}

#[tokio::test]
async fn a_live_reslice_to_8_and_back_to_4_accepts_every_post_once_without_a_mailman_cfg_edit() {
    let mut c = cluster(&["r1", "r2"], 4, "").await;
    let cfg_before = std::fs::read_to_string(&c.site.config).expect("mailman.cfg");
    c.site.post(100, 0).expect("post");
    c.site.post_in_background(300, 100, 40.0).expect("post");
    wait_for_accepts(&c.site, 20).await;
    for slices in [8u32, 4] {
        c.ctl(&["queue", "set", "in", "--slices", &slices.to_string(), "--mailman3"]);
        let site = &c.site;
        wait_for_async(LONG, "every slice running under the new count", || {
            let running: BTreeSet<u32> =
                site.report().map(|r| r.runners.values().filter(|x| x.count == slices && x.stopped.is_none()).map(|x| x.slice).collect()).unwrap_or_default();
            async move { running.len() == slices as usize }
        })
        .await
        .expect("resliced");
    }
    let report = c.all_accepted(400).await;
    assert_each_post_once(&report, 400);
    // The barrier: no runner under one count overlapped a runner under another. A slice
    // runner that died without its stop line (its node fenced on a loaded machine: the
    // leash or its own kill timer ended it at the fence deadline) ended when its node said so.
    let logs: BTreeMap<String, String> = c.tc.runners().iter().map(|(n, p)| (n.clone(), p.log())).collect();
    let end_of =
        |pid: &str, run: &qslice_tests::mailman3::RunnerLine| run.stopped.or_else(|| logs.get(&run.node).and_then(|log| death_in_log(log, pid, run.started))).unwrap_or(f64::MAX);
    for (a_pid, a) in &report.runners {
        for (b_pid, b) in report.runners.iter().filter(|(_, b)| b.count != a.count) {
            let (a_end, b_end) = (end_of(a_pid, a), end_of(b_pid, b));
            assert!(
                a_end <= b.started || b_end <= a.started,
                "runners under {} and {} slices overlapped: {a:?} (ended {a_end}) {b:?} (ended {b_end})\n{}",
                a.count,
                b.count,
                c.logs()
            );
        }
    }
    assert_eq!(std::fs::read_to_string(&c.site.config).expect("mailman.cfg"), cfg_before, "mailman.cfg untouched");
    assert!(cfg_before.contains("instances: 1"), "the site's mailman.cfg says 1 instance; qslice's count won");
}

#[tokio::test]
async fn a_slice_runner_that_keeps_crashing_is_given_up_and_its_slices_move() {
    let site = Site::new().expect("site");
    // One host's mailman.cfg is broken: every start of Mailman there fails.
    let broken = site.spool.scratch("broken.cfg");
    std::fs::write(&broken, "[mailman\nthis is not a configuration file\n").expect("write");
    let bad_toml =
        format!("[supervise.in]\npython = {:?}\nconfig = {:?}\nmax_restarts = 2\nrestart_window = \"60s\"\n", site.python.display().to_string(), broken.display().to_string());
    let bad_cfg = site.spool.scratch("bad.toml");
    std::fs::write(&bad_cfg, bad_toml).expect("write");
    let good_cfg = site.runner_config("good.toml", "").expect("config");
    // The bad node never holds its share: wait only until both have registered.
    let tc = TestCluster::builder()
        .spool(site.spool.clone())
        .queue("in", 4)
        .coordinators(1)
        .runner_with("bad", &["--config", bad_cfg.to_str().expect("utf8")], &[])
        .runner_with("good", &["--config", &good_cfg], &[])
        .ready(Ready::Registered)
        .ready_timeout(LONG)
        .start()
        .await
        .expect("cluster");
    let (mut c, bad) = (tc.client(), tc.runner("bad"));
    site.post(60, 0).expect("post");
    wait_for_async(LONG, "the good node holds every slice", || async { holdings(&mut c.clone(), "t", "in").await.get("good").is_some_and(|v| v.len() == 4) }).await.expect("moved");
    let keys = qslice_proto::keys::Keys::new("t").expect("keys");
    let node = c.get(keys.node("bad"), None).await.expect("get");
    let record = <qslice_proto::records::NodeRecord as qslice_proto::records::Record>::decode(node.kvs()[0].value()).expect("record");
    assert_eq!(record.refused_queues, vec!["in"], "the bad node published its refusal");
    assert!(bad.log().contains("alert: giving this queue up"), "the refusal is an alert in the log: {}", bad.log());
    let report = site.all_accepted(60, LONG).await.expect("every post accepted");
    assert_each_post_once(&report, 60);
    for accept in report.accepts.values().flatten() {
        assert_eq!(report.runner_of(accept).map(|r| r.node.as_str()), Some("good"), "only the good node's runners accept");
    }
    // The host's mailman.cfg is fixed: the refusal ends at once, not after its cooldown,
    // and the node gets its share again.
    std::fs::copy(&site.config, &broken).expect("fix mailman.cfg");
    wait_for_async(LONG, "the fixed node holding slices again", || async { holdings(&mut c.clone(), "t", "in").await.get("bad").is_some_and(|v| !v.is_empty()) })
        .await
        .expect("refusal lifted");
    assert!(bad.log().contains("refusal lifted"), "{}", bad.log());
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64()
}

#[tokio::test]
async fn a_supervised_queues_backlog_and_in_flight_entries_show_in_status() {
    // A node id of its own: its processes are found (and frozen) by their QSLICE_NODE.
    let node = format!("r1-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let c = cluster(&[&node], 2, "spares = 0\n").await;
    // Mailman stalls (its slice runners frozen): the posts wait, and one entry is in flight.
    let stalled = pids_with_env(&format!("QSLICE_NODE={node}"));
    assert!(!stalled.is_empty(), "slice runners running");
    for pid in &stalled {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    }
    c.site.post(40, 0).expect("post");
    let queue_dir = c.site.dir.join("var/queue/in");
    let pck = std::fs::read_dir(&queue_dir).expect("ls").flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|x| x == "pck")).expect("a post");
    std::fs::rename(&pck, pck.with_extension("bak")).expect("one in flight");
    let status = || {
        let out = c.ctl(&["status", "--slices", "--json"]);
        serde_json::from_str::<serde_json::Value>(&out).expect("JSON")
    };
    let mut last = serde_json::Value::Null;
    let shown = wait_for_async(LONG, "the backlog and the in-flight entry in qslicectl status", || {
        last = status();
        let slices = last["slices"].as_array().cloned().unwrap_or_default();
        let depth: u64 = slices.iter().filter_map(|s| s["depth"].as_u64()).sum();
        let in_flight: u64 = slices.iter().filter_map(|s| s["in_flight"].as_u64()).sum();
        let aged = slices.iter().any(|s| s["oldest_entry_age_seconds"].as_f64().is_some_and(|a| a > 0.0));
        async move { depth == 39 && in_flight == 1 && aged }
    })
    .await;
    for pid in &stalled {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), nix::sys::signal::Signal::SIGCONT);
    }
    shown.unwrap_or_else(|e| panic!("{e}: {last}"));
    let table = c.ctl(&["status", "--slices"]);
    assert!(table.contains("in") && !table.lines().filter(|l| l.starts_with("in ")).all(|l| l.contains(" 0 ")), "the table shows the depth: {table}");
}

#[tokio::test]
async fn a_slice_count_mailman_cannot_run_is_alerted_at_once_and_the_fix_resumes_processing() {
    let mut c = cluster(&["r1", "r2"], 4, "spares = 2\n").await;
    // 3 slices: Mailman 3 only slices by powers of two; every node refuses the queue.
    let written = std::time::Instant::now();
    c.tc.put_queue("in", 3).await.expect("queue");
    let status = |c: &Cluster| serde_json::from_str::<serde_json::Value>(&c.ctl(&["status", "--json"])).expect("JSON");
    let mut last = serde_json::Value::Null;
    wait_for_async(LONG, "the no-eligible-node alert in qslicectl status", || {
        last = status(&c);
        let alerted =
            last["alerts"].as_array().is_some_and(|a| a.iter().any(|x| x.as_str().is_some_and(|s| s.contains("no eligible node") && s.contains("r1") && s.contains("r2"))));
        async move { alerted }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {last}"));
    let alerted_after = written.elapsed();
    let queues = c.ctl(&["queues"]);
    assert!(queues.contains("no eligible node"), "the queue's state says so: {queues}");
    c.site.post(40, 0).expect("post");
    c.warm_spares(2).await;
    // The fix: a power of two. The refusals end at once and the posts flow again.
    let fixed_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
    let fixed = std::time::Instant::now();
    c.tc.put_queue("in", 4).await.expect("queue");
    let site = &c.site;
    wait_for_async(LONG, "a post accepted after the fix", || {
        let n = site.report().map(|r| r.accepts.values().flatten().filter(|a| a.0 > fixed_at).count()).unwrap_or(0);
        async move { n > 0 }
    })
    .await
    .expect("processing again");
    let resumed_after = fixed.elapsed();
    println!("refusal -> alert in qslicectl status after {alerted_after:?}; fix -> first post accepted after {resumed_after:?}");
    let report = c.all_accepted(40).await;
    assert_each_post_once(&report, 40);
    assert!(alerted_after <= Duration::from_secs(1), "the alert took {alerted_after:?}");
    assert!(resumed_after <= Duration::from_secs(2), "processing resumed {resumed_after:?} after the fix");
}

#[tokio::test]
async fn files_mailman_cannot_serve_are_quarantined_and_every_post_is_accepted_once() {
    let mut c = cluster(&["r1", "r2"], 2, "").await;
    let queue_dir = c.site.dir.join("var/queue/in");
    // A real post under an upper-case digest: Mailman reads it with int(digest, 16) and
    // serves it, so it must be served, not quarantined.
    let staged = c.site.stage(1, 1000).expect("stage");
    let name = staged[0].file_name().expect("name").to_string_lossy().into_owned();
    let (time, digest) = name.trim_end_matches(".pck").split_once('+').expect("a Mailman name");
    let upper = format!("{time}+{}.pck", digest.to_uppercase());
    // Junk Mailman's listing would raise on (no '+'; a time that is not a number), in
    // the queue before the posts and while they flow.
    std::fs::write(queue_dir.join("junk.pck"), b"not a pickle").expect("junk");
    std::fs::write(queue_dir.join(format!("abc+{digest}.pck")), b"not a pickle").expect("junk");
    std::fs::rename(&staged[0], queue_dir.join(&upper)).expect("upper-case entry");
    // The .tmp of a queue file write cut off two hours ago (a crash, or a kill at the
    // fence as a paused host thawed), and one being written now.
    let stale = format!("{time}+{digest}.pck.tmp");
    let fresh = format!("{time}+{}.pck.tmp", "0".repeat(40));
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    std::fs::File::create(queue_dir.join(&stale)).and_then(|f| f.set_modified(two_hours_ago)).expect("stale .tmp");
    std::fs::write(queue_dir.join(&fresh), b"being written").expect("fresh .tmp");
    c.site.post(30, 0).expect("post");
    c.site.post_in_background(30, 30, 20.0).expect("post");
    wait_for_accepts(&c.site, 10).await;
    std::fs::write(queue_dir.join("late-junk.bak"), b"not a pickle").expect("junk");
    let report = c.all_accepted(61).await;
    assert_each_post_once(&report, 61);
    assert!(report.accepts.contains_key("<qslice-1000@example.com>"), "the upper-case entry was served");
    let quarantine = c.site.dir.join("var/queue/.qslice/quarantine/in");
    let mut quarantined: Vec<String> = std::fs::read_dir(&quarantine).expect("quarantine dir").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    quarantined.sort();
    let mut expected = vec![stale, format!("abc+{digest}.pck"), "junk.pck".to_owned(), "late-junk.bak".to_owned()];
    expected.sort();
    assert_eq!(quarantined, expected, "exactly the junk, intact");
    assert!(queue_dir.join(&fresh).exists(), "a .tmp being written now is left alone");
    assert_eq!(std::fs::read(quarantine.join("junk.pck")).expect("read"), b"not a pickle");
    // No node gave the queue up; the quarantine was alerted.
    let logs: String = c.tc.runners().values().map(|r| r.log()).collect();
    assert!(!logs.contains("giving this queue up"), "a node refused the queue:\n{}", c.logs());
    assert!(logs.contains("alert: a file Mailman cannot serve was quarantined"), "the quarantine is alerted:\n{}", c.logs());
    assert_eq!(c.holds("r1").await.len() + c.holds("r2").await.len(), 2, "both slices still held");
}

/// Milliseconds on CLOCK_BOOTTIME, the slice runner's lease clock.
fn boottime_ms() -> u128 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).expect("clock");
    Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32).as_millis()
}

#[test]
fn a_slice_runner_lives_on_its_renewals_and_dies_when_frozen_past_its_deadline() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    // The slice runner's deadline is a kernel timer (CLOCK_BOOTTIME, SIGKILL) that each
    // renewal moves: renewed every 200 ms, 1.5 s ahead, it outlives its first deadline
    // and serves posts; frozen (SIGSTOP, as a host pause) with its renewals stopped, the
    // kernel kills it at its deadline, with no instruction of its own run after it.
    let site = Site::new().expect("site");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../runner/src/mailman3/qslice_mailman3.py");
    let mut child = std::process::Command::new(&site.python)
        .args([script, "--config"])
        .arg(&site.config)
        .args(["--runner", "in"])
        .env("QSLICE_NODE", "renewed")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the slice runner");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let mut stdin = child.stdin.take().expect("stdin");
    let (tx, events) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let expect = |word: &str| {
        let line = events.recv_timeout(LONG).unwrap_or_else(|_| panic!("no {word} event"));
        assert!(line.starts_with(word), "expected {word}, got {line}");
    };
    expect("ready");
    let first_deadline = boottime_ms() + 1500;
    writeln!(stdin, "go 0 1 7 {first_deadline}").expect("go");
    expect("running");
    // qslice's side: a renewal every 200 ms, 1.5 s ahead, from a thread of its own, until
    // told to quit.
    let quit = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let renewer = {
        let quit = quit.clone();
        std::thread::spawn(move || {
            while !quit.load(std::sync::atomic::Ordering::SeqCst) {
                if writeln!(stdin, "lease {}", boottime_ms() + 1500).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    site.post(3, 0).expect("post");
    let accepted = site.all_accepted_blocking(3, LONG).map(|r| r.accepts.len()).unwrap_or(0);
    assert_eq!(accepted, 3, "the renewed runner serves posts");
    qslice_tests::wait_for(LONG, "the first deadline passed", || boottime_ms() > first_deadline + 500).expect("time");
    assert!(child.try_wait().expect("wait").is_none(), "the renewals moved the kill timer: the runner outlived its first deadline");
    // The host pauses: the process is frozen and qslice's renewals stop with it.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    quit.store(true, std::sync::atomic::Ordering::SeqCst);
    renewer.join().expect("renewer");
    let frozen_ms = boottime_ms();
    let mut status = None;
    let waited = qslice_tests::wait_for(LONG, "the frozen slice runner to die", || {
        status = child.try_wait().expect("wait");
        status.is_some()
    });
    let died_ms = boottime_ms();
    if waited.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert_eq!(status.and_then(|s| s.signal()), Some(libc::SIGKILL), "killed by its kernel timer while frozen: {status:?}");
    let seen: Vec<String> = events.try_iter().collect();
    assert!(!seen.iter().any(|e| e == "fenced" || e == "stopped"), "it ran nothing after its deadline: {seen:?}");
    println!("frozen with 1.5 s left: killed by its timer {} ms later", died_ms - frozen_ms);
}

/// When a qslice-runner's log (RFC 3339 UTC timestamps) says the Mailman slice runner
/// `pid`, started at `started` (Unix seconds), ended without a stop line of its own: a
/// line about that pid saying it stopped, crashed or was killed, or the node's fence (which
/// ends every slice runner of the node by its deadline). The earliest such time.
fn death_in_log(log: &str, pid: &str, started: f64) -> Option<f64> {
    let pid_field = format!("pid={pid}");
    log.lines()
        .filter(|l| {
            let about_pid = l.split_whitespace().any(|w| w == pid_field) && ["stopped", "crashed", "killing it"].iter().any(|w| l.contains(w));
            about_pid || l.contains("fenced: stopped all work")
        })
        .filter_map(|l| {
            let stamp = l.split_whitespace().next()?;
            let t = humantime::parse_rfc3339(stamp).ok()?.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64();
            (t >= started).then_some(t)
        })
        .reduce(f64::min)
}
