//! The runner, as a real process against a real etcd: claims, processing, hand-over,
//! crash recovery, quarantine, waiting for etcd, fast restart.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use qslice_tests::cluster::{claims, files_in};
use qslice_tests::testcluster::TestCluster;
use qslice_tests::{wait_for, wait_for_async};

/// Generous bound for things that take a second or two on an idle machine.
const LONG: Duration = Duration::from_secs(60);

#[tokio::test]
async fn one_runner_claims_and_drains_every_slice_of_a_queue() {
    let mut tc = TestCluster::builder().assign("r1", "in", 8, 0..8).start().await.expect("cluster");
    let spool = tc.spool().clone();
    let q = spool.queue("in");
    let mut names = Vec::new();
    for i in 0..40u32 {
        names.push(q.enqueue_in_slice(format!("m{i}").as_bytes(), i % 8, 8).expect("enqueue").filebase);
    }
    let mut c = tc.client();
    tc.start_runner("r1").expect("runner");
    wait_for_async(LONG, "all 40 entries finished", || async { spool.finished().len() == 40 }).await.expect("drained");
    let held = claims(&mut c, "t", "in").await.expect("claims");
    assert_eq!(held.len(), 8, "every slice claimed: {held:?}");
    assert!(held.values().all(|(n, _)| n == "r1"));
    let finished = spool.finished();
    assert!(finished.values().all(|n| *n == 1), "each entry once: {finished:?}");
    for name in &names {
        assert!(finished.contains_key(name), "{name} processed");
    }
    // Each entry was handed over under its slice's claim epoch.
    for r in spool.records() {
        assert_eq!(held[&r.slice].1, r.epoch, "{r:?}");
    }
    wait_for_async(LONG, "queue dir empty", || async { files_in(q.dir()).is_empty() }).await.expect("empty");
}

#[tokio::test]
async fn two_runners_never_hold_one_claim() {
    // A faulty leader assigns the same slices to both.
    let tc = TestCluster::builder().assign("a", "in", 4, 0..4).assign("b", "in", 4, 0..4).runners(&["a", "b"]).start().await.expect("cluster");
    let (spool, mut c) = (tc.spool(), tc.client());
    let q = spool.queue("in");
    for i in 0..40u32 {
        q.enqueue_in_slice(format!("m{i}").as_bytes(), i % 4, 4).expect("enqueue");
    }
    wait_for_async(LONG, "all 40 entries finished", || async { spool.finished().len() == 40 }).await.expect("drained");
    let held = claims(&mut c, "t", "in").await.expect("claims");
    assert_eq!(held.len(), 4);
    // Every entry of a slice was processed by the one node holding the slice's claim.
    for r in spool.records() {
        assert_eq!(held[&r.slice].0, r.node, "slice {} processed by a non-holder: {r:?}", r.slice);
    }
    assert!(spool.finished().values().all(|n| *n == 1));
}

#[tokio::test]
async fn sigterm_hands_every_slice_over_with_no_entry_lost() {
    let mut tc = TestCluster::builder().assign("a", "in", 4, 0..4).runner_with("a", &["--lease-ttl", "10s"], &[("QSLICE_TEST_DELAY", "0.2")]).start().await.expect("cluster");
    let (spool, mut c) = (tc.spool().clone(), tc.client());
    let q = spool.queue("in");
    for i in 0..30u32 {
        q.enqueue_in_slice(format!("m{i}").as_bytes(), i % 4, 4).expect("enqueue");
    }
    wait_for_async(LONG, "a to start processing", || async { !spool.records().is_empty() }).await.expect("started");
    let a = tc.runner_mut("a");
    a.signal(Signal::SIGTERM).expect("SIGTERM");
    let status = a.wait_exit(LONG).expect("a exits");
    assert!(status.success(), "graceful stop exits 0: {status}\n{}", a.log());
    // Claims were deleted and the lease revoked at once, not after the 10 s TTL.
    assert!(claims(&mut c, "t", "in").await.expect("claims").is_empty());
    let starts = spool.records().iter().filter(|r| r.what == "start").count();
    assert_eq!(spool.finished().len(), starts, "in-flight work finished before exit");
    tc.unassign("a", "in").await.expect("unassign");
    tc.assign("b", "in", 4, 0..4).await.expect("assign");
    tc.start_runner("b").expect("runner b");
    wait_for_async(LONG, "all 30 entries finished", || async { spool.finished().len() == 30 }).await.expect("drained");
    assert!(spool.finished().values().all(|n| *n == 1), "no entry twice after a graceful hand-over");
}

#[tokio::test]
async fn kill_9_leaves_bak_entries_that_the_next_owner_recovers() {
    let mut tc = TestCluster::builder().assign("a", "in", 2, 0..2).runner_with("a", &[], &[("QSLICE_TEST_DELAY", "600")]).start().await.expect("cluster");
    let spool = tc.spool().clone();
    let q = spool.queue("in");
    let e0 = q.enqueue_in_slice(b"zero", 0, 2).expect("enqueue").filebase;
    let e1 = q.enqueue_in_slice(b"one", 1, 2).expect("enqueue").filebase;
    wait_for_async(LONG, "both entries in flight", || async { spool.records().len() == 2 }).await.expect("in flight");
    tc.runner_mut("a").kill();
    let baks: Vec<String> = files_in(q.dir()).into_iter().filter(|f| f.ends_with(".bak")).collect();
    assert_eq!(baks, {
        let mut v = vec![format!("{e0}.bak"), format!("{e1}.bak")];
        v.sort();
        v
    });
    tc.unassign("a", "in").await.expect("unassign");
    tc.assign("b", "in", 2, 0..2).await.expect("assign");
    tc.start_runner("b").expect("runner b");
    wait_for_async(LONG, "b finishes both recovered entries", || async {
        let f = spool.finished();
        f.contains_key(&e0) && f.contains_key(&e1)
    })
    .await
    .expect("recovered");
    let b_epochs: Vec<i64> = spool.records().iter().filter(|r| r.node == "b").map(|r| r.epoch).collect();
    let a_epochs: Vec<i64> = spool.records().iter().filter(|r| r.node == "a").map(|r| r.epoch).collect();
    assert!(b_epochs.iter().all(|b| a_epochs.iter().all(|a| b > a)), "the new owner works under newer epochs");
    assert_eq!(q.recovery_count(&e0).expect("count"), 1, "the recovery was counted");
}

#[tokio::test]
async fn malformed_spool_files_land_in_quarantine() {
    let mut tc = TestCluster::builder().assign("r", "in", 1, [0]).start().await.expect("cluster");
    let spool = tc.spool().clone();
    let q = spool.queue("in");
    std::fs::write(q.dir().join("no-plus.pck"), b"x").expect("write");
    std::fs::create_dir(q.dir().join("subdir")).expect("mkdir");
    q.enqueue_as(1.0, &"0".repeat(40).parse().expect("digest"), b"").expect("empty entry");
    let good = q.enqueue(b"fine").expect("enqueue").filebase;
    tc.start_runner("r").expect("runner");
    wait_for_async(LONG, "the good entry finished", || async { spool.finished().contains_key(&good) }).await.expect("good");
    wait_for_async(LONG, "three files quarantined", || async { files_in(q.quarantine_dir()).len() == 3 }).await.expect("quarantined");
    let quarantined = files_in(q.quarantine_dir());
    assert!(quarantined.contains(&"no-plus.pck".to_owned()) && quarantined.contains(&"subdir".to_owned()), "{quarantined:?}");
    // The handler records its end before the runner unlinks the entry's .bak.
    wait_for_async(LONG, "the queue dir empty once the good entry is finished", || async { files_in(q.dir()).is_empty() }).await.expect("empty");
}

#[tokio::test]
async fn a_runner_started_while_etcd_is_down_waits_and_then_works() {
    let mut tc = TestCluster::builder().assign("r", "in", 1, [0]).start().await.expect("cluster");
    let spool = tc.spool().clone();
    tc.etcd_mut().stop();
    tc.start_runner("r").expect("runner");
    let name = spool.queue("in").enqueue(b"m").expect("enqueue").filebase;
    wait_for(LONG, "the runner to say etcd is unreachable", || tc.runner("r").log().contains("etcd is unreachable")).expect("logged");
    assert!(spool.records().is_empty(), "nothing processed without a claim");
    tc.etcd_mut().restart().expect("etcd back");
    wait_for_async(LONG, "the entry finished once etcd is up", || async { spool.finished().contains_key(&name) }).await.expect("works");
}

#[tokio::test]
async fn fast_restart_reclaims_slices_well_under_the_ttl() {
    let ttl = ["--lease-ttl", "30s"];
    let mut tc = TestCluster::builder().assign("r", "in", 4, 0..4).runner_with("r", &ttl, &[]).start().await.expect("cluster");
    let mut c = tc.client();
    wait_for_async(LONG, "4 claims", || async { claims(&mut c.clone(), "t", "in").await.map(|m| m.len() == 4).unwrap_or(false) }).await.expect("claimed");
    let before = claims(&mut c, "t", "in").await.expect("claims");
    tc.runner_mut("r").kill();
    let killed = Instant::now();
    tc.start_runner_with("r", &ttl, &[]).expect("restart");
    wait_for_async(LONG, "4 new claims", || async {
        claims(&mut c.clone(), "t", "in").await.map(|m| m.len() == 4 && m.iter().all(|(s, (_, e))| *e > before[s].1)).unwrap_or(false)
    })
    .await
    .expect("reclaimed");
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(30), "reclaimed through the lock, not the 30 s TTL (took {took:?})");
}

#[tokio::test]
async fn a_runner_paused_beyond_its_ttl_starts_nothing_until_it_has_re_registered() {
    let tc = TestCluster::builder().assign("a", "in", 2, 0..2).runner_with("a", &[], &[("QSLICE_TEST_DELAY", "0.05")]).start().await.expect("cluster");
    let (spool, mut c, a) = (tc.spool(), tc.client(), tc.runner("a"));
    let q = spool.queue("in");
    q.enqueue_in_slice(b"first", 0, 2).expect("enqueue");
    wait_for_async(LONG, "a processes the first entry", || async { spool.finished().len() == 1 }).await.expect("first");
    let old_epochs: Vec<i64> = claims(&mut c, "t", "in").await.expect("claims").values().map(|(_, e)| *e).collect();
    a.signal(Signal::SIGSTOP).expect("SIGSTOP");
    // Entries arrive while it is frozen; its 2 s lease lapses and etcd drops its claims.
    for i in 0..10u32 {
        q.enqueue_in_slice(format!("m{i}").as_bytes(), i % 2, 2).expect("enqueue");
    }
    wait_for_async(LONG, "the paused runner's claims to expire", || async { claims(&mut c.clone(), "t", "in").await.map(|m| m.is_empty()).unwrap_or(false) })
        .await
        .expect("expired");
    let resumed_ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos();
    a.signal(Signal::SIGCONT).expect("SIGCONT");
    wait_for_async(LONG, "all 11 entries finished", || async { spool.finished().len() == 11 }).await.expect("drained");
    let after: Vec<_> = spool.records().into_iter().filter(|r| r.what == "start" && r.at_ns > resumed_ns).collect();
    assert!(!after.is_empty());
    for r in &after {
        assert!(old_epochs.iter().all(|old| r.epoch > *old), "entry {} started after the pause under a stale epoch {} (old claims {old_epochs:?})", r.filebase, r.epoch);
    }
    assert!(a.log().contains("fenced"), "the runner logged its fence:\n{}", a.log());
}

#[tokio::test]
async fn a_planned_move_releases_before_the_new_owner_claims() {
    let tc = TestCluster::builder()
        .assign("a", "in", 2, 0..2)
        .runner_args(&["--lease-ttl", "30s"])
        .runner_env(&[("QSLICE_TEST_DELAY", "0.3")])
        .runners(&["a", "b"])
        .start()
        .await
        .expect("cluster");
    let (spool, mut c) = (tc.spool(), tc.client());
    let q = spool.queue("in");
    for i in 0..16u32 {
        q.enqueue_in_slice(format!("m{i}").as_bytes(), i % 2, 2).expect("enqueue");
    }
    wait_for_async(LONG, "a to be busy", || async { spool.records().iter().any(|r| r.node == "a") }).await.expect("busy");
    // The leader moves both slices: new owner first, then the old owner's assignment goes.
    tc.assign("b", "in", 2, 0..2).await.expect("assign b");
    tc.unassign("a", "in").await.expect("unassign a");
    wait_for_async(LONG, "all 16 entries finished", || async { spool.finished().len() == 16 }).await.expect("drained");
    let records = spool.records();
    assert!(spool.finished().values().all(|n| *n == 1), "no entry twice in a planned move");
    for slice in 0..2 {
        let last_a_end = records.iter().filter(|r| r.slice == slice && r.node == "a" && r.what == "end").map(|r| r.at_ns).max();
        let first_b_start = records.iter().filter(|r| r.slice == slice && r.node == "b" && r.what == "start").map(|r| r.at_ns).min();
        if let (Some(a_end), Some(b_start)) = (last_a_end, first_b_start) {
            assert!(b_start > a_end, "slice {slice}: b started before a's in-flight work ended");
        }
    }
    // The move took well under the 30 s TTL: it was a release, not an expiry.
    let held = claims(&mut c, "t", "in").await.expect("claims");
    assert!(held.values().all(|(n, _)| n == "b"), "{held:?}");
}

#[tokio::test]
async fn metrics_and_readiness_are_served() {
    let port = qslice_tests::free_port().expect("port");
    let addr = format!("127.0.0.1:{port}");
    let tc = TestCluster::builder().assign("r", "in", 2, 0..2).runner_with("r", &["--metrics-addr", &addr], &[]).start().await.expect("cluster");
    let spool = tc.spool();
    let name = spool.queue("in").enqueue(b"m").expect("enqueue").filebase;
    wait_for_async(LONG, "the entry finished", || async { spool.finished().contains_key(&name) }).await.expect("done");
    let get = |path: &str| -> String {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(&addr) else { return String::new() };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    wait_for(LONG, "/readyz to answer 200", || get("/readyz").starts_with("HTTP/1.0 200")).expect("ready");
    wait_for(LONG, "the finished entry in /metrics", || get("/metrics").contains("qslice_runner_entries_total{queue=\"in\",outcome=\"finished\"} 1")).expect("metrics");
    let metrics = get("/metrics");
    assert!(metrics.contains("qslice_runner_slices_claimed 2"), "{metrics}");
    assert!(metrics.contains("qslice_runner_slice_depth"), "{metrics}");
    assert!(get("/healthz").contains("ok"));
}

#[tokio::test]
async fn the_worker_handler_drains_a_queue_with_one_coprocess_per_slice() {
    let mut tc = TestCluster::builder().assign("w", "in", 3, 0..3).start().await.expect("cluster");
    let spool = tc.spool().clone();
    let q = spool.queue("in");
    for i in 0..60u32 {
        q.enqueue_in_slice(format!("m{i}").as_bytes(), i % 3, 3).expect("enqueue");
    }
    let worker = spool.recording_worker();
    tc.start_runner_with("w", &["--handler", "worker", "--handler-command", &worker], &[]).expect("runner");
    wait_for_async(LONG, "all 60 entries finished", || async { spool.finished().len() == 60 }).await.expect("drained");
    assert!(spool.finished().values().all(|n| *n == 1));
    let coprocesses: Vec<u32> = spool.records().iter().filter(|r| r.what == "worker").map(|r| r.slice).collect();
    assert_eq!(coprocesses.len(), 3, "one coprocess per slice, not per entry: {coprocesses:?}");
    wait_for_async(LONG, "queue dir empty", || async { files_in(q.dir()).is_empty() }).await.expect("finished entries unlinked");
}

#[tokio::test]
async fn in_flight_work_beyond_the_drain_timeout_is_killed_and_recovered_by_the_next_owner() {
    let tc = TestCluster::builder()
        .assign("a", "in", 1, [0])
        .runner_args(&["--lease-ttl", "30s"])
        .runner_with("a", &["--drain-timeout", "1s"], &[("QSLICE_TEST_DELAY", "600")])
        .runners(&["b"])
        .start()
        .await
        .expect("cluster");
    let (spool, a) = (tc.spool(), tc.runner("a"));
    let q = spool.queue("in");
    let name = q.enqueue(b"stuck").expect("enqueue").filebase;
    wait_for_async(LONG, "a to start the entry", || async { !spool.records().is_empty() }).await.expect("started");
    let moved = Instant::now();
    tc.assign("b", "in", 1, [0]).await.expect("assign b");
    tc.unassign("a", "in").await.expect("unassign a");
    wait_for_async(LONG, "b to finish the entry a was stuck on", || async { spool.records().iter().any(|r| r.what == "end" && r.node == "b" && r.filebase == name) })
        .await
        .expect("recovered by b");
    let took = moved.elapsed();
    assert!(took < Duration::from_secs(30), "the move waited for the drain timeout, not the 30 s TTL ({took:?})");
    assert!(a.log().contains("drain timeout"), "a said why it killed the work:\n{}", a.log());
    assert!(!spool.records().iter().any(|r| r.what == "end" && r.node == "a"), "a's handler was killed, not finished");
}

#[tokio::test]
async fn slice_figures_are_published_to_etcd_and_logs_can_be_json() {
    // Slice 1 has entries and no owner; the holder of slice 0 reports it.
    let mut tc = TestCluster::builder().assign("r", "in", 2, [0]).start().await.expect("cluster");
    let (spool, mut c) = (tc.spool().clone(), tc.client());
    let q = spool.queue("in");
    for i in 0..3u32 {
        q.enqueue_in_slice(format!("m{i}").as_bytes(), 1, 2).expect("enqueue");
    }
    let r = tc.start_runner_with("r", &["--log-format", "json"], &[]).expect("runner");
    let keys = qslice_proto::keys::Keys::new("t").expect("keys");
    async fn read_status(c: &mut etcd_client::Client, key: String) -> Option<(qslice_proto::records::SliceStatus, i64)> {
        use qslice_proto::records::Record;
        let resp = c.get(key, None).await.ok()?;
        let kv = resp.kvs().first()?;
        Some((qslice_proto::records::SliceStatus::decode(kv.value()).expect("valid status"), kv.lease()))
    }
    let key = keys.status("r", "in");
    wait_for_async(LONG, "the status record of r/in", || {
        let (mut c, key) = (c.clone(), key.clone());
        async move { read_status(&mut c, key).await.is_some() }
    })
    .await
    .expect("published");
    let status = read_status(&mut c, key).await;
    let (status, lease) = status.expect("set");
    assert_ne!(lease, 0, "figures are attached to the runner's lease");
    let by_slice: std::collections::BTreeMap<u32, u64> = status.slices.iter().map(|f| (f.slice, f.depth)).collect();
    assert_eq!(by_slice.get(&0), Some(&0), "its own slice, empty");
    assert_eq!(by_slice.get(&1), Some(&3), "the unowned slice with its waiting entries");
    assert!(status.slices.iter().find(|f| f.slice == 1).expect("slice 1").oldest_age_ms < 600_000);
    assert!(spool.records().is_empty(), "nothing of the unowned slice was processed");
    let log = r.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v.get("level").is_some() && v.get("fields").is_some(), "{line}");
    }
}

#[tokio::test]
async fn both_daemons_warn_when_etcd_can_revoke_leases_early() {
    let out = std::process::Command::new("/usr/bin/etcd").arg("--version").output().expect("etcd --version");
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.lines().find_map(|l| l.strip_prefix("etcd Version: ")).expect("etcd prints its version").trim().to_owned();
    let tc = TestCluster::builder().queue("in", 2).coordinators(1).runners(&["r1"]).start().await.expect("cluster");
    let logs = [tc.runner("r1").log(), tc.coordinator("c1").proc.log()];
    let warned = |log: &str| log.contains("older than 3.4.31 / 3.5.13") && log.contains(&version);
    match qslice_common::etcd::version_warning(&version) {
        Some(_) => assert!(logs.iter().all(|l| warned(l)), "etcd {version} is old: both daemons say so\n{}", logs.join("\n---\n")),
        None => assert!(!logs.iter().any(|l| warned(l)), "etcd {version} is safe: no warning"),
    }
}

#[tokio::test]
async fn an_entry_renamed_into_an_idle_queue_is_taken_without_waiting_for_the_poll() {
    // A poll of an hour: only the inotify hint can bring the entry in within the wait.
    let tc = TestCluster::builder().assign("r", "in", 2, 0..2).runner_with("r", &["--poll-interval", "1h"], &[]).start().await.expect("cluster");
    let spool = tc.spool();
    let q = spool.queue("in");
    // The loop went idle after its listings of the claimed slices (it lists once more after
    // arming the watch); then one entry arrives the way Mailman writes it (.tmp, rename).
    wait_for_async(LONG, "both slices claimed", || async { tc.claims("in").await.is_ok_and(|c| c.len() == 2) }).await.expect("claimed");
    let first = q.enqueue_in_slice(b"first", 0, 2).expect("enqueue").filebase;
    wait_for(LONG, "the first entry finished", || spool.finished().contains_key(&first)).expect("taken at its arrival");
    // Idle again after the work it started: the next arrival wakes it too.
    let second = q.enqueue_in_slice(b"second", 1, 2).expect("enqueue").filebase;
    wait_for(LONG, "the second entry finished", || spool.finished().contains_key(&second)).expect("taken at its arrival");
    assert!(spool.finished().values().all(|n| *n == 1));
}

#[tokio::test]
async fn a_slice_claimed_while_a_backlog_is_worked_through_is_served_in_the_round_robin_at_once() {
    // One entry at a time, 0.5 s each: slice 0's backlog of 16 takes 8 s.
    let tc = TestCluster::builder().assign("r", "in", 2, [0]).runner_with("r", &["--concurrency", "1"], &[("QSLICE_TEST_DELAY", "0.5")]).start().await.expect("cluster");
    let spool = tc.spool();
    let q = spool.queue("in");
    for i in 0..16u32 {
        q.enqueue_in_slice(format!("backlog {i}").as_bytes(), 0, 2).expect("enqueue");
    }
    let newcomer = q.enqueue_in_slice(b"newcomer", 1, 2).expect("enqueue").filebase;
    wait_for(LONG, "the backlog under way", || spool.records().iter().any(|r| r.slice == 0 && r.what == "end")).expect("busy");
    tc.assign("r", "in", 2, 0..2).await.expect("assign slice 1 too");
    let assigned_ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos();
    wait_for(LONG, "the new slice's entry finished", || spool.finished().contains_key(&newcomer)).expect("newcomer");
    let records = spool.records();
    let newcomer_start = records.iter().find(|r| r.filebase == newcomer && r.what == "start").expect("newcomer started").at_ns;
    let backlog_started_before = records.iter().filter(|r| r.slice == 0 && r.what == "start" && r.at_ns > assigned_ns && r.at_ns < newcomer_start).count();
    // The pass that listed the backlog ends at its next wait for a permit; the next pass
    // alternates between the slices: one entry in flight at the claim, one more at most
    // (and one if the claim itself took an entry's time). Without that, all of the
    // backlog came first.
    assert!(backlog_started_before <= 3, "{backlog_started_before} backlog entries started between the claim of slice 1 and its entry");
    wait_for(LONG, "everything finished", || spool.finished().len() == 17).expect("drained");
}
