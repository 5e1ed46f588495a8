//! Fencing that does not depend on the runner process: the leash kills a frozen runner's
//! children at its fence deadline, a dead runner's leash revokes its lease at once, and a
//! whole host frozen past its TTL starts nothing under its old epoch when it thaws. With
//! the exec handler and with real Mailman 3.3.10 (tests/src/mailman3.rs). Host pauses are
//! the cgroup v1 freezer (tests/src/freezer.rs).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, UNIX_EPOCH};

use qslice_tests::cluster::{claims, files_in};
use qslice_tests::freezer::Freezer;
use qslice_tests::mailman3::{Report, Site};
use qslice_tests::now_ns;
use qslice_tests::pids_with_env;
use qslice_tests::testcluster::TestCluster;
use qslice_tests::wait_for_async;

const LONG: Duration = Duration::from_secs(120);

/// A node id of this test's own: tests run side by side, and processes are found by their
/// `QSLICE_NODE`.
fn node(name: &str) -> String {
    format!("{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// Whether the 4 slices are claimed, some by `a` and some by `b`.
async fn both_hold(c: &etcd_client::Client, a: &str, b: &str) -> bool {
    let held = claims(&mut c.clone(), "t", "in").await.unwrap_or_default();
    held.len() == 4 && held.values().any(|(n, _)| n == a) && held.values().any(|(n, _)| n == b)
}

async fn all_held_by(c: &etcd_client::Client, node: &str, slices: usize) -> bool {
    claims(&mut c.clone(), "t", "in").await.is_ok_and(|m| m.len() == slices && m.values().all(|(n, _)| n == node))
}

#[tokio::test]
async fn a_frozen_runners_handlers_are_killed_before_another_node_claims_its_slices() {
    let (n1, n2) = (node("r1"), node("r2"));
    // Handlers that take 30 s: in flight when the runner freezes.
    let mut tc = TestCluster::builder().assign(&n1, "in", 2, 0..2).runner_with(&n1, &[], &[("QSLICE_TEST_DELAY", "30")]).start().await.expect("cluster");
    let (spool, mut c) = (tc.spool().clone(), tc.client());
    let q = spool.queue("in");
    for i in 0..4u32 {
        q.enqueue_in_slice(format!("m{i}").as_bytes(), i % 2, 2).expect("enqueue");
    }
    wait_for_async(LONG, "r1's handlers running", || async { pids_with_env(&format!("QSLICE_NODE={n1}")).len() >= 2 }).await.expect("running");
    let old_epochs: BTreeSet<i64> = claims(&mut c, "t", "in").await.expect("claims").values().map(|(_, e)| *e).collect();
    // qslice-runner alone freezes (hung in a stuck call, say); its children run on.
    let freezer = Freezer::new().expect("freezer");
    freezer.add(&[tc.runner(&n1).pid().expect("pid")]).expect("add");
    freezer.freeze().expect("freeze");
    tc.unassign(&n1, "in").await.expect("unassign");
    tc.assign(&n2, "in", 2, 0..2).await.expect("assign");
    tc.start_runner(&n2).expect("r2");
    let r1 = tc.runner(&n1);
    wait_for_async(LONG, "r2 holding both slices (after r1's lease ran out)", || all_held_by(&c, &n2, 2)).await.expect("taken over");
    let claimed_ns = now_ns();
    let survivors = pids_with_env(&format!("QSLICE_NODE={n1}"));
    assert!(survivors.is_empty(), "processes of the frozen runner still alive when another node holds its slices: {survivors:?}");
    wait_for_async(LONG, "every entry finished by r2", || async { spool.finished().len() == 4 }).await.expect("finished");
    for rec in spool.records() {
        assert!(rec.node != n1 || rec.at_ns < claimed_ns, "the frozen runner's handler recorded after the new owner's claim: {rec:?}");
        assert!(rec.node != n1 || rec.what != "end", "a handler of the frozen runner ran to its end: {rec:?}");
    }
    assert!(r1.log().contains("killed") && r1.log().contains("leash"), "the leash says what it did: {}", r1.log());
    assert!(files_in(&spool.root().join("bad")).is_empty(), "a handler killed at the fence is no failed entry: nothing goes to bad/");
    // Thawed, r1 fences itself and starts nothing under its old epochs.
    let thawed_ns = now_ns();
    freezer.thaw().expect("thaw");
    wait_for_async(LONG, "r1 fenced and registered again", || async { r1.log().matches(&format!("registered node={n1}")).count() >= 2 }).await.expect("re-registered");
    assert!(!spool.records().iter().any(|r| r.node == n1 && r.at_ns > thawed_ns && old_epochs.contains(&r.epoch)), "a start under an old epoch after the thaw");
}

#[tokio::test]
async fn a_frozen_runners_mailman_slice_runners_take_nothing_after_another_node_claims() {
    let (n1, n2) = (node("r1"), node("r2"));
    let site = Site::new().expect("site");
    let cfg = site.runner_config("runner.toml", "").expect("config");
    let mut tc = TestCluster::builder()
        .spool(site.spool.clone())
        .assign(&n1, "in", 2, 0..2)
        .runner_args(&["--config", &cfg])
        .runners(&[&n1])
        .ready_timeout(LONG)
        .start()
        .await
        .expect("cluster");
    let c = tc.client();
    site.post(300, 0).expect("post");
    wait_for_async(LONG, "r1 accepting posts", || {
        let n = site.report().map(|r| r.accepts.len()).unwrap_or(0);
        async move { n >= 10 }
    })
    .await
    .expect("accepting");
    let freezer = Freezer::new().expect("freezer");
    freezer.add(&[tc.runner(&n1).pid().expect("pid")]).expect("add");
    freezer.freeze().expect("freeze");
    let frozen_at = now_ns() as f64 / 1e9;
    tc.unassign(&n1, "in").await.expect("unassign");
    tc.assign(&n2, "in", 2, 0..2).await.expect("assign");
    tc.start_runner(&n2).expect("r2");
    wait_for_async(LONG, "r2 holding both slices", || all_held_by(&c, &n2, 2)).await.expect("taken over");
    let claimed_at = now_ns() as f64 / 1e9;
    let survivors = pids_with_env(&format!("QSLICE_NODE={n1}"));
    assert!(survivors.is_empty(), "Mailman processes of the frozen runner alive when another node holds its slices: {survivors:?}");
    let report = site.all_accepted(300, LONG).await.expect("every post accepted");
    let by_r1_late: Vec<_> = report.accepts.values().flatten().filter(|a| a.0 > claimed_at && report.runner_of(a).is_some_and(|x| x.node == n1)).collect();
    assert!(by_r1_late.is_empty(), "ACCEPTs by the frozen runner's Mailman after the new owner's claim: {by_r1_late:?}");
    assert_eq!(report.shunt, 0, "shunted");
    assert_eq!(report.bad, 0, "in bad/");
    // Only a post in hand at the fence deadline may go twice: one per slice at most.
    let doubled = report.doubled();
    assert!(doubled.len() <= 2, "{doubled:?}");
    for id in doubled.keys() {
        let first = &report.accepts[*id][0];
        assert!(report.runner_of(first).is_some_and(|x| x.node == n1) && first.0 < claimed_at, "{id} first accepted by {:?}", report.runner_of(first));
    }
    println!("froze r1 at {frozen_at:.3}, r2 held its slices at {claimed_at:.3}; {} posts doubled", doubled.len());
}

#[tokio::test]
async fn a_host_frozen_past_its_ttl_starts_nothing_under_its_old_epoch_when_it_thaws() {
    let (n1, n2) = (node("r1"), node("r2"));
    let tc = TestCluster::builder().queue("in", 4).coordinators(1).runner_env(&[("QSLICE_TEST_DELAY", "0.3")]).runners(&[&n1, &n2]).start().await.expect("cluster");
    let (spool, mut c, r1) = (tc.spool(), tc.client(), tc.runner(&n1));
    wait_for_async(LONG, "both runners holding slices", || both_hold(&c, &n1, &n2)).await.expect("balanced");
    let q = spool.queue("in");
    let mut enqueued = Vec::new();
    for i in 0..40u32 {
        enqueued.push(q.enqueue_in_slice(format!("a{i}").as_bytes(), i % 4, 4).expect("enqueue").filebase);
    }
    wait_for_async(LONG, "r1 working", || async { spool.records().iter().any(|r| r.node == n1 && r.what == "start") }).await.expect("working");
    let old_epochs: BTreeSet<i64> = claims(&mut c, "t", "in").await.expect("claims").values().filter(|(n, _)| *n == n1).map(|(_, e)| *e).collect();
    // The whole host pauses: qslice-runner, its leash and its handlers together.
    let freezer = Freezer::new().expect("freezer");
    freezer.add_tree(r1.pid().expect("pid")).expect("add");
    freezer.freeze().expect("freeze");
    let frozen_ns = now_ns();
    wait_for_async(LONG, "r2 holding every slice", || all_held_by(&c, &n2, 4)).await.expect("taken over");
    for i in 0..20u32 {
        enqueued.push(q.enqueue_in_slice(format!("b{i}").as_bytes(), i % 4, 4).expect("enqueue").filebase);
    }
    let thawed_ns = now_ns();
    freezer.thaw().expect("thaw");
    wait_for_async(LONG, "every entry finished", || async {
        let finished = spool.finished();
        enqueued.iter().all(|e| finished.contains_key(e))
    })
    .await
    .expect("finished");
    wait_for_async(LONG, "r1 registered again", || async { r1.log().matches(&format!("registered node={n1}")).count() >= 2 }).await.expect("re-registered");
    let records = spool.records();
    assert!(files_in(&spool.root().join("bad")).is_empty(), "work killed by the pause is recovered, never put in bad/");
    let stale: Vec<_> = records.iter().filter(|r| r.what == "start" && r.node == n1 && r.at_ns > thawed_ns && old_epochs.contains(&r.epoch)).collect();
    assert!(stale.is_empty(), "starts under r1's old epochs after the thaw: {stale:?}");
    // Only what was in flight at the freeze may run twice.
    for e in &enqueued {
        let starts: Vec<_> = records.iter().filter(|r| r.what == "start" && &r.filebase == e).collect();
        if starts.len() > 1 {
            assert!(starts[0].node == n1 && starts[0].at_ns < frozen_ns && starts.len() == 2, "{e} started {} times: {starts:?}", starts.len());
        }
    }
}

/// A runner frozen past its TTL (its leash and handler left running) learns of its fence
/// only when it thaws, after its lease lapsed; the leash had killed its handler at the
/// fence deadline. Its stop mark still goes down, so the entry's recovery at the next
/// claim does not count toward `bad/`: a host that fences often (starved of CPU) must
/// not send healthy mail to `bad/` at its third fence.
#[tokio::test]
async fn a_handler_stopped_at_a_fence_the_runner_learns_of_late_counts_no_recovery() {
    let n1 = node("r1");
    // The only runner: nobody else recovers the entry while it is frozen.
    let tc = TestCluster::builder().queue("in", 1).coordinators(1).runner_env(&[("QSLICE_TEST_DELAY", "6")]).runners(&[&n1]).start().await.expect("cluster");
    let (spool, c, r1) = (tc.spool(), tc.client(), tc.runner(&n1));
    wait_for_async(LONG, "r1 holding the slice", || all_held_by(&c, &n1, 1)).await.expect("held");
    let entry = spool.queue("in").enqueue_in_slice(b"stopped at a fence", 0, 1).expect("enqueue").filebase;
    wait_for_async(LONG, "the handler running", || async { !pids_with_env(&format!("QSLICE_NODE={n1}")).is_empty() }).await.expect("running");
    // Only qslice-runner freezes: its leash kills the handler at the fence deadline, and
    // the lease lapses (nothing keeps it alive).
    let freezer = Freezer::new().expect("freezer");
    freezer.add(&[r1.pid().expect("pid")]).expect("add the runner");
    freezer.freeze().expect("freeze");
    wait_for_async(LONG, "the leash killing the handler", || async { pids_with_env(&format!("QSLICE_NODE={n1}")).is_empty() }).await.expect("killed");
    wait_for_async(LONG, "r1's lease lapsed", || async { !tc.is_registered(&n1).await }).await.expect("lapsed");
    freezer.thaw().expect("thaw");
    wait_for_async(LONG, "the entry finished after its recovery", || async { spool.finished().contains_key(&entry) }).await.expect("finished");
    let log = r1.log();
    let recovered: Vec<&str> = log.lines().filter(|l| l.contains("recovered an in-flight entry") && l.contains(&entry)).collect();
    assert_eq!(recovered.len(), 1, "the entry recovered once, at r1's next claim:\n{log}");
    assert!(recovered[0].contains("recoveries=0"), "a handler qslice stopped counts no recovery: {}", recovered[0]);
    assert!(log.contains("stop mark written after the claim may have lapsed"), "r1 says its stop mark was late:\n{log}");
    assert!(files_in(&spool.root().join("bad")).is_empty(), "nothing in bad/");
}

#[tokio::test]
async fn a_killed_runners_leash_revokes_its_lease_so_its_slices_move_without_waiting_for_the_ttl() {
    let (n1, n2) = (node("r1"), node("r2"));
    // A 60 s lease: a takeover within the wait below can only come from the revoke.
    let mut tc = TestCluster::builder()
        .queue("in", 4)
        .coordinators(1)
        .runner_args(&["--lease-ttl", "60s"])
        .runner_with(&n1, &[], &[("QSLICE_TEST_DELAY", "30")])
        .runners(&[&n2])
        .start()
        .await
        .expect("cluster");
    let (spool, c) = (tc.spool().clone(), tc.client());
    wait_for_async(LONG, "both runners holding slices", || both_hold(&c, &n1, &n2)).await.expect("balanced");
    let q = spool.queue("in");
    for i in 0..8u32 {
        q.enqueue_in_slice(format!("m{i}").as_bytes(), i % 4, 4).expect("enqueue");
    }
    wait_for_async(LONG, "r1's handlers running", || async { !pids_with_env(&format!("QSLICE_NODE={n1}")).is_empty() }).await.expect("running");
    let killed = std::time::Instant::now();
    tc.runner_mut(&n1).kill();
    let r1 = tc.runner(&n1);
    wait_for_async(Duration::from_secs(20), "r2 holding every slice long before r1's 60 s lease could expire", || all_held_by(&c, &n2, 4)).await.expect("moved at once");
    println!("kill -9 of qslice-runner -> r2 holds every slice after {:?} (lease TTL 60 s)", killed.elapsed());
    let leash: Vec<String> = r1.log().lines().filter(|l| l.contains("leash")).map(str::to_owned).collect();
    println!("{}", leash.join("\n"));
    println!("{}", tc.coordinator("c1").proc.log().lines().rev().take(8).collect::<Vec<_>>().join("\n"));
    assert!(pids_with_env(&format!("QSLICE_NODE={n1}")).is_empty(), "r1's handlers are gone");
    wait_for_async(LONG, "every entry finished", || async { spool.finished().len() == 8 }).await.expect("finished");
}

#[tokio::test]
async fn a_revoked_runner_starts_no_entry_after_another_node_claims_its_slice() {
    let (n1, n2) = (node("r1"), node("r2"));
    // r1 works through queue in's backlog (10 ms an entry) on a 9 s lease, renewed every 3 s.
    let mut tc = TestCluster::builder()
        .queue("in", 1)
        .spool_queues(&["in", "out"])
        .coordinators(1)
        .coordinator_args(&["--revoke-deadline", "2s"])
        .runner_with(&n1, &["--lease-ttl", "9s"], &[("QSLICE_TEST_DELAY", "0.01")])
        .start()
        .await
        .expect("cluster");
    let (spool, mut c) = (tc.spool().clone(), tc.client());
    wait_for_async(LONG, "r1 holding in/0", || all_held_by(&c, &n1, 1)).await.expect("claimed");
    for i in 0..3000u32 {
        spool.queue("in").enqueue_in_slice(format!("m{i}").as_bytes(), 0, 1).expect("enqueue");
    }
    wait_for_async(LONG, "r1 working through the backlog", || async { spool.records().iter().any(|r| r.node == n1) }).await.expect("busy");

    // Queue out has an entry in flight whose recovery count is a FIFO nobody writes: the
    // recovery of a slice of out hangs in the read, as on a stalled filesystem, and r1's
    // incarnation loop waits for it. Its keepalives and its work on in/0 go on.
    let out = spool.queue("out");
    let stalled = out.enqueue_in_slice(b"stalled", 0, 1).expect("enqueue");
    let pck = spool.root().join("out").join(format!("{}.pck", stalled.filebase));
    std::fs::rename(&pck, pck.with_extension("bak")).expect("make it in flight");
    let counts = spool.root().join(".qslice/recovery/out");
    std::fs::create_dir_all(&counts).expect("recovery dir");
    let fifo = counts.join(&stalled.filebase);
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    tc.put_queue("out", 1).await.expect("queue out");
    wait_for_async(LONG, "r1 claiming out/0 (its recovery then hangs)", || async {
        claims(&mut c.clone(), "t", "out").await.is_ok_and(|m| m.get(&0).is_some_and(|(n, _)| *n == n1))
    })
    .await
    .expect("out claimed");

    // r1 is cordoned and r2 joins: r1 cannot release in/0 (its loop hangs), so the leader
    // revokes its lease at the revoke deadline.
    let keys = qslice_proto::keys::Keys::new("t").expect("keys");
    let cordon = qslice_proto::records::Cordon { v: qslice_proto::records::RECORD_VERSION, reason: "test".into(), since_unix_ms: 0 };
    c.put(keys.cordon(&n1), qslice_proto::records::Record::encode(&cordon), None).await.expect("cordon");
    tc.start_runner(&n2).expect("r2");
    wait_for_async(LONG, "r2 holding in/0", || all_held_by(&c, &n2, 1)).await.expect("taken over");
    let claim = c.get(keys.claim("in", 0), None).await.expect("read the claim");
    let claim = claim.kvs().first().map(|kv| <qslice_proto::records::Claim as qslice_proto::records::Record>::decode(kv.value()).expect("claim record")).expect("a claim");
    let claimed_ns = claim.claimed_unix_ms as u128 * 1_000_000;
    let leader = tc.coordinator("c1").proc.log();
    assert!(leader.contains("lease revoked"), "r1 was fenced by a revoke (its loop hung), not by a release:\n{leader}");
    let late: Vec<_> = spool.records().into_iter().filter(|r| r.node == n1 && r.what == "start" && r.at_ns >= claimed_ns).collect();
    let r1_last = spool.records().iter().filter(|r| r.node == n1 && r.what == "start").map(|r| r.at_ns).max().unwrap_or(0);
    println!("r2 claimed in/0 {:.0} ms after r1's last start", (claimed_ns as f64 - r1_last as f64) / 1e6);
    assert!(late.is_empty(), "r1 started {} entries after r2 claimed in/0, the first {:?}\n{}", late.len(), late.first(), tc.runner(&n1).log());
    wait_for_async(LONG, "r2 taking up the backlog r1 was working through", || async { spool.records().iter().any(|r| r.node == n2) }).await.expect("r2 busy");
    // The hang ends: a writer opens the FIFO (nobody else does), and r1 goes on.
    let _ = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(&fifo);
}

/// How many times each post (`<qslice-N@example.com>`) was enqueued into pipeline/, which
/// no runner serves in these tests: its Message-ID appears as plain UTF-8 in the pickle.
fn pipeline_copies(spool: &std::path::Path) -> BTreeMap<String, Vec<f64>> {
    let mut copies = BTreeMap::new();
    for f in std::fs::read_dir(spool.join("pipeline")).into_iter().flatten().flatten() {
        if f.path().extension().is_none_or(|e| e != "pck") {
            continue;
        }
        let bytes = std::fs::read(f.path()).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let written = f.metadata().and_then(|m| m.modified()).expect("mtime").duration_since(UNIX_EPOCH).expect("clock").as_secs_f64();
        if let Some(at) = text.find("<qslice-") {
            let id: String = text[at..].chars().take_while(|c| *c != '>').chain(['>']).collect();
            copies.entry(id).or_insert_with(Vec::new).push(written);
        }
    }
    copies
}

/// `.tmp` files under the spool's queue directories: a write cut off (Mailman writes a
/// queue file as `.tmp`, then renames it).
fn torn_writes(spool: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for dir in std::fs::read_dir(spool).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(dir.path()).into_iter().flatten().flatten() {
            if f.path().extension().is_some_and(|e| e == "tmp") {
                out.push(f.path());
            }
        }
    }
    out
}

#[tokio::test]
async fn a_host_frozen_past_its_ttl_with_its_mailman_runners_runs_nothing_when_it_thaws() {
    let (n1, n2) = (node("r1"), node("r2"));
    let site = Site::new().expect("site");
    let cfg = site.runner_config("runner.toml", "spares = 2\n").expect("config");
    let tc = TestCluster::builder()
        .spool(site.spool.clone())
        .queue("in", 4)
        .coordinators(1)
        .runner_args(&["--config", &cfg])
        .runners(&[&n1, &n2])
        .ready_timeout(LONG)
        .start()
        .await
        .expect("cluster");
    let mut c = tc.client();
    let mut posted = 0;
    let mut pauses = Vec::new();
    // Posts in hand when a pause landed between Mailman's ACCEPT and its removal of the
    // .bak: Mailman's own crash window, served again by the next owner.
    let mut crash_window = BTreeSet::new();
    // Five pauses of a whole host under a backlog, r1 and r2 in turn, each past the TTL.
    for round in 0..5 {
        let (victim, other) = if round % 2 == 0 { (&n1, &n2) } else { (&n2, &n1) };
        wait_for_async(LONG, "both runners holding slices", || both_hold(&c, &n1, &n2)).await.expect("balanced");
        let old_epochs: BTreeSet<i64> = claims(&mut c, "t", "in").await.expect("claims").values().filter(|(n, _)| n == victim).map(|(_, e)| *e).collect();
        let accepted_by_victim = || site.report().map(|r| r.accepts.values().flatten().filter(|a| r.runner_of(a).is_some_and(|x| x.node == *victim)).count()).unwrap_or(0);
        let before = accepted_by_victim();
        site.post(200, posted).expect("post");
        wait_for_async(LONG, "the victim accepting this round's posts", || {
            let n = accepted_by_victim();
            async move { n >= 3 + before }
        })
        .await
        .expect("accepting");
        let host = FrozenHost::freeze(&tc, victim);
        let frozen_at = now_ns() as f64 / 1e9;
        wait_for_async(LONG, "the other runner holding every slice", || all_held_by(&c, other, 4)).await.expect("taken over");
        site.post(50, posted + 200).expect("post more");
        posted += 250;
        let thawed_at = now_ns() as f64 / 1e9;
        host.thaw();
        pauses.push((frozen_at, thawed_at));
        let report = site.all_accepted(posted, LONG).await.expect("every post accepted");
        let pause = Pause { round, victim, frozen_at, thawed_at };
        nothing_ran_after_the_thaw(&report, &pause, &old_epochs, &mut crash_window);
        wait_for_async(LONG, "the victim registered again", || tc.is_registered(victim)).await.expect("back");
    }
    each_post_in_pipeline_once(&site, &pauses, &crash_window, posted);
}

/// A whole host paused: qslice-runner, its leash, its slice runners and spares. qslice-runner
/// and its leash have a freezer of their own, thawed a second after the slice runners:
/// whether they run again first after a pause must not matter.
struct FrozenHost {
    freezer: Freezer,
    qslice_freezer: Freezer,
}

impl FrozenHost {
    fn freeze(tc: &TestCluster, node: &str) -> FrozenHost {
        let pid = tc.runner(node).pid().expect("pid");
        let leash: Vec<u32> = qslice_tests::freezer::process_tree(pid)
            .into_iter()
            .filter(|p| std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains("--leash")))
            .collect();
        assert_eq!(leash.len(), 1, "the runner's leash: {leash:?}");
        let (freezer, qslice_freezer) = (Freezer::new().expect("freezer"), Freezer::new().expect("freezer"));
        freezer.add_tree(pid).expect("add");
        qslice_freezer.add(&[pid, leash[0]]).expect("move the runner and its leash to their own freezer");
        qslice_freezer.freeze().expect("freeze the runner and its leash");
        freezer.freeze().expect("freeze");
        FrozenHost { freezer, qslice_freezer }
    }

    fn thaw(self) {
        self.freezer.thaw().expect("thaw");
        std::thread::sleep(Duration::from_secs(1));
        self.qslice_freezer.thaw().expect("thaw the runner and its leash");
    }
}

/// One round's pause of a host.
struct Pause<'a> {
    round: usize,
    victim: &'a str,
    frozen_at: f64,
    thawed_at: f64,
}

/// Nothing ran after the thaw: no slice runner of the victim started under an old epoch
/// (`old_epochs`), and its frozen slice runners (killed by their timers as they thawed)
/// accepted nothing, not even the message each had in hand. A post accepted twice must be
/// one in Mailman's crash window (added to `crash_window`).
fn nothing_ran_after_the_thaw(report: &Report, pause: &Pause, old_epochs: &BTreeSet<i64>, crash_window: &mut BTreeSet<String>) {
    let Pause { round, victim, frozen_at, thawed_at } = *pause;
    let late_starts: Vec<_> = report.runners.values().filter(|x| x.node == victim && x.started > frozen_at && old_epochs.contains(&x.epoch)).collect();
    assert!(late_starts.is_empty(), "round {round}: {late_starts:?}");
    let late: Vec<_> = report.accepts.values().flatten().filter(|a| a.0 > thawed_at && report.runner_of(a).is_some_and(|x| x.node == victim && x.started < frozen_at)).collect();
    assert!(late.is_empty(), "round {round}: the frozen slice runners accepted {} posts after the thaw: {late:?}", late.len());
    assert_eq!((report.shunt, report.bad), (0, 0), "round {round}: shunted, in bad/");
    let doubled = report.doubled();
    // A pause that lands between Mailman's ACCEPT and its removal of the .bak is a crash
    // inside one message: Mailman's own recovery serves that message again. Any other
    // second ACCEPT would be two owners at once.
    for id in doubled.keys().filter(|id| report.accepts[**id].iter().any(|a| a.0 > frozen_at)) {
        let first = &report.accepts[*id][0];
        assert!(first.0 < frozen_at && report.runner_of(first).is_some_and(|x| x.node == victim), "round {round}: {id} accepted twice, first by {:?}", report.runner_of(first));
        crash_window.insert(id.to_string());
    }
    println!(
        "round {round}: {victim} frozen {:.1} s; {} ACCEPTs by its old slice runners after the thaw; {} posts accepted twice in all",
        thawed_at - frozen_at,
        late.len(),
        doubled.len()
    );
}

/// Each of the `posted` posts went into pipeline/ once, but for those of Mailman's crash
/// window; a .tmp left behind was written as a pause began.
fn each_post_in_pipeline_once(site: &Site, pauses: &[(f64, f64)], crash_window: &BTreeSet<String>, posted: usize) {
    // Each post went down the pipeline once, but for those in Mailman's crash window: a
    // thawed slice runner that finished its message in hand would have put a second copy
    // there (with one ACCEPT only, as it is killed before it logs one) besides the new
    // owner's. Mailman's accept chain enqueues into pipeline/ before it logs ACCEPT, so
    // a pause between the two leaves a copy written as the pause began and no ACCEPT by
    // the victim: that is the crash window too, told apart from a thawed runner's copy
    // by when it was written.
    let copies = pipeline_copies(&site.spool.root());
    let before_a_pause = |written: f64| pauses.iter().any(|(frozen, _)| written <= frozen + 0.5 && written > frozen - 10.0);
    let (enqueued_at_a_pause, twice): (Vec<_>, Vec<_>) = copies
        .iter()
        .filter(|(id, at)| at.len() > 1 && !crash_window.contains(id.as_str()))
        .partition(|(_, at)| at.len() == 2 && at.iter().filter(|w| before_a_pause(**w)).count() == 1);
    println!(
        "{} posts in pipeline/, {} twice from a pause between ACCEPT and the end of the message, {} from a pause between the enqueue and ACCEPT, {} twice otherwise",
        copies.len(),
        crash_window.len(),
        enqueued_at_a_pause.len(),
        twice.len()
    );
    assert!(twice.is_empty(), "posts enqueued into pipeline/ more than once, not by a pause inside Mailman's handling of the message: {twice:?}, pauses {pauses:?}");
    assert_eq!(copies.len(), posted, "every post once in pipeline/");
    // A pause that lands inside Mailman's write of a queue file (write, fsync, rename)
    // leaves its .tmp behind, as a crash there would: the message itself is served again
    // from the .bak. But nothing is written after a thaw.
    for path in torn_writes(&site.spool.root()) {
        let written = std::fs::metadata(&path).and_then(|m| m.modified()).expect("mtime").duration_since(UNIX_EPOCH).expect("clock").as_secs_f64();
        assert!(
            pauses.iter().any(|(frozen, _)| written <= frozen + 0.5 && written > frozen - 10.0),
            "{} was written at {written:.3}, not as a pause began: {pauses:?}",
            path.display()
        );
        println!("left by a pause mid-write: {}", path.display());
    }
}

/// The nice value of process `pid` (field 19 of /proc/<pid>/stat).
fn nice_of(pid: u32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().nth(16)).and_then(|n| n.parse().ok()).expect("nice field")
}

#[test]
fn the_built_leash_raises_its_scheduling_priority_and_says_so_when_it_may_not() {
    use std::io::Read;
    let start = |unprivileged: bool| {
        let mut cmd = std::process::Command::new(qslice_tests::qslice_bin("qslice-runner").expect("built"));
        cmd.arg("--leash").stdin(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        if unprivileged {
            use std::os::unix::process::CommandExt;
            // No CAP_SYS_NICE and an RLIMIT_NICE of 0: as an unprivileged service
            // without LimitNICE.
            cmd.uid(65534).gid(65534);
            // SAFETY: setrlimit in the child before exec touches no shared state.
            #[allow(unsafe_code)]
            unsafe {
                cmd.pre_exec(|| {
                    let none = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                    if libc::setrlimit(libc::RLIMIT_NICE, &none) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        cmd.spawn().expect("start the leash")
    };
    let mut leash = start(false);
    qslice_tests::wait_for(Duration::from_secs(30), "the leash at nice -10", || nice_of(leash.id()) == -10).expect("raised");
    drop(leash.stdin.take());
    let _ = leash.wait();
    let mut unprivileged = start(true);
    drop(unprivileged.stdin.take());
    let _ = unprivileged.wait();
    let mut said = String::new();
    unprivileged.stderr.take().expect("stderr").read_to_string(&mut said).expect("read");
    assert!(said.contains("cannot raise its scheduling priority") && said.contains("LimitNICE=-10"), "it says why and what to do: {said}");
}

/// A `sleep` in a process group of its own, as the runner's children are.
fn sleeper() -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("300").process_group(0);
    cmd.spawn().expect("spawn sleep")
}

#[test]
fn the_built_leash_keeps_a_lapsed_lease_dead_and_kills_groups_added_after_its_deadline() {
    use std::io::Write;
    let mut leash = std::process::Command::new(qslice_tests::qslice_bin("qslice-runner").expect("built"))
        .arg("--leash")
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the leash");
    let mut to_leash = leash.stdin.take().expect("stdin");
    let mut send = |line: &str| writeln!(to_leash, "{line}").expect("write to the leash");
    let gone = |child: &mut std::process::Child| matches!(child.try_wait(), Ok(Some(_)));
    let long = Duration::from_secs(30);
    // Added under lease 7, killed at its deadline.
    let mut first = sleeper();
    send("lease 7 300");
    send(&format!("add {}", first.id()));
    qslice_tests::wait_for(long, "the group killed at the deadline", || gone(&mut first)).expect("killed");
    // Added after the deadline: killed at once.
    let mut late = sleeper();
    send(&format!("add {}", late.id()));
    qslice_tests::wait_for(long, "a group added after the deadline killed", || gone(&mut late)).expect("killed");
    // A late renewal of lease 7 does not revive it.
    send("lease 7 60000");
    let mut revived = sleeper();
    send(&format!("add {}", revived.id()));
    qslice_tests::wait_for(long, "a group added after a late renewal of a lapsed lease killed", || gone(&mut revived)).expect("killed");
    // A new lease (a new incarnation) arms the leash again: its deadline as the runner
    // sends it, absolute on CLOCK_BOOTTIME.
    let boot = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).expect("clock");
    let boot_ms = boot.tv_sec() as u128 * 1000 + boot.tv_nsec() as u128 / 1_000_000;
    send(&format!("until 8 {}", boot_ms + 60_000));
    let mut kept = sleeper();
    send(&format!("add {}", kept.id()));
    // A negative: watched for a few of the leash's ticks (50 ms each) to see a wrong kill.
    std::thread::sleep(Duration::from_millis(300));
    assert!(!gone(&mut kept), "a group of the new lease was killed");
    // The runner's own `lease <id> 0` is a stop: it says so, not that a renewal was missed.
    send("lease 8 0");
    qslice_tests::wait_for(long, "the group killed on the runner's own stop", || gone(&mut kept)).expect("killed");
    send("bye");
    drop(to_leash);
    let out = leash.wait_with_output().expect("leash output");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("ignoring a renewal of lease 7"), "{log}");
    assert!(log.contains("the runner ended its lease"), "the stop is told apart: {log}");
    assert_eq!(log.matches("the fence deadline passed without a renewal").count(), 1, "only lease 7 lapsed: {log}");
    for line in log.lines() {
        assert!(line.starts_with("20") && line.contains('T'), "a timestamp leads each line: {line}");
    }
}

/// A leash starved of CPU (here: stopped) past its deadline, with a renewal the runner
/// wrote in time waiting in its pipe, reads the renewal before it looks at the deadline:
/// no kill of the children of a runner whose lease is alive.
#[test]
fn a_leash_that_reads_a_timely_renewal_late_kills_nothing() {
    use std::io::Write;
    let mut leash = std::process::Command::new(qslice_tests::qslice_bin("qslice-runner").expect("built"))
        .arg("--leash")
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the leash");
    let mut to_leash = leash.stdin.take().expect("stdin");
    let mut send = |line: &str| writeln!(to_leash, "{line}").expect("write to the leash");
    let gone = |child: &mut std::process::Child| matches!(child.try_wait(), Ok(Some(_)));
    let boot_ms = || {
        let boot = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).expect("clock");
        boot.tv_sec() as u128 * 1000 + boot.tv_nsec() as u128 / 1_000_000
    };
    let mut child = sleeper();
    send(&format!("until 9 {}", boot_ms() + 500));
    send(&format!("add {}", child.id()));
    let leash_pid = nix::unistd::Pid::from_raw(leash.id() as i32);
    // Once it has read both lines (a line it has not read yet would be read after SIGCONT
    // anyway): stopped, renewed in time while stopped, resumed past the first deadline.
    std::thread::sleep(Duration::from_millis(100));
    nix::sys::signal::kill(leash_pid, nix::sys::signal::Signal::SIGSTOP).expect("stop the leash");
    send(&format!("until 9 {}", boot_ms() + 60_000));
    std::thread::sleep(Duration::from_millis(800));
    nix::sys::signal::kill(leash_pid, nix::sys::signal::Signal::SIGCONT).expect("resume the leash");
    // A negative: watched for many of the leash's ticks (20 ms each) to see a wrong kill.
    std::thread::sleep(Duration::from_millis(500));
    assert!(!gone(&mut child), "the leash killed a group although the renewal was written before its deadline");
    send("lease 9 0");
    qslice_tests::wait_for(Duration::from_secs(30), "the group killed on the runner's own stop", || gone(&mut child)).expect("killed");
    send("bye");
    drop(to_leash);
    let out = leash.wait_with_output().expect("leash output");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!log.contains("the fence deadline passed without a renewal"), "{log}");
}
