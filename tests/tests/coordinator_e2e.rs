//! The coordinator with real runners and a real etcd: balanced assignment, failover,
//! leader takeover, fenced hand-off, maintenance.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use qslice_proto::records::{Cordon, Maintenance, Record, RECORD_VERSION};
use qslice_tests::cluster::{holdings, leader};
use qslice_tests::testcluster::TestCluster;
use qslice_tests::{wait_for, wait_for_async};

const LONG: Duration = Duration::from_secs(60);

fn total(h: &BTreeMap<String, Vec<u32>>) -> usize {
    h.values().map(Vec::len).sum()
}

#[tokio::test]
async fn slices_are_spread_evenly_and_a_dead_runners_slices_are_taken_over() {
    let mut tc = TestCluster::builder().queue("in", 12).coordinators(1).runners(&["r1", "r2", "r3"]).start().await.expect("cluster");
    let (spool, mut c) = (tc.spool().clone(), tc.client());
    wait_for_async(LONG, "12 slices claimed, 4 per runner", || async {
        let h = holdings(&mut c.clone(), "t", "in").await;
        h.len() == 3 && h.values().all(|v| v.len() == 4)
    })
    .await
    .expect("balanced");
    let before = holdings(&mut c, "t", "in").await;
    let q = spool.queue("in");
    for i in 0..24u32 {
        q.enqueue_in_slice(format!("m{i}").as_bytes(), i % 12, 12).expect("enqueue");
    }
    wait_for_async(LONG, "24 entries finished", || async { spool.finished().len() == 24 }).await.expect("flowing");

    tc.runner_mut("r1").kill();
    let killed = Instant::now();
    wait_for_async(LONG, "r1's slices claimed by r2 and r3", || async {
        let h = holdings(&mut c.clone(), "t", "in").await;
        !h.contains_key("r1") && total(&h) == 12
    })
    .await
    .expect("taken over");
    eprintln!("failover: r1's 4 slices claimed by others {:?} after kill -9 (lease TTL 2 s)", killed.elapsed());
    let after = holdings(&mut c, "t", "in").await;
    // Only the dead runner's slices moved.
    for r in ["r2", "r3"] {
        assert!(before[r].iter().all(|s| after[r].contains(s)), "{r} lost a slice: {before:?} -> {after:?}");
    }
    for i in 0..12u32 {
        q.enqueue_in_slice(format!("late{i}").as_bytes(), i, 12).expect("enqueue");
    }
    wait_for_async(LONG, "every slice processes again", || async { spool.finished().len() == 36 }).await.expect("no idle slice");
}

#[tokio::test]
async fn a_standby_coordinator_takes_over_when_the_leader_dies() {
    let mut tc = TestCluster::builder().queue("in", 4).coordinators(2).runners(&["r1"]).start().await.expect("cluster");
    let mut c = tc.client();
    wait_for_async(LONG, "r1 holds all 4 slices", || async { holdings(&mut c.clone(), "t", "in").await.get("r1").is_some_and(|v| v.len() == 4) }).await.expect("assigned");
    let first = leader(&mut c, "t").await.expect("a leader");
    // The standby's campaign waits as long as the leader leads: past etcd's request
    // timeout (3 s) it neither fails nor queues again (behind a leader that re-campaigned
    // meanwhile, it would never lead).
    let standby = if first == "c1" { "c2" } else { "c1" };
    tokio::time::sleep(Duration::from_secs(5)).await; // the wait itself: longer than the request timeout
    let log = tc.coordinator(standby).proc.log();
    assert!(!log.contains("campaign failed"), "the standby's campaign was cut short:\n{log}");
    assert_eq!(log.matches("campaigning for leadership").count(), 1, "the standby campaigned once:\n{log}");
    tc.coordinator_mut(&first).proc.kill();
    let killed = Instant::now();
    wait_for_async(LONG, "the standby to lead", || async { leader(&mut c.clone(), "t").await.is_some_and(|l| l != first) }).await.expect("takeover");
    eprintln!("leader takeover after kill -9: {:?} (lease TTL 2 s)", killed.elapsed());
    // The new leader acts: a joining runner gets its share.
    tc.start_runner("r2").expect("runner");
    wait_for_async(LONG, "r2 gets 2 of the 4 slices", || async {
        let h = holdings(&mut c.clone(), "t", "in").await;
        h.get("r1").is_some_and(|v| v.len() == 2) && h.get("r2").is_some_and(|v| v.len() == 2)
    })
    .await
    .expect("new leader balances");
}

#[tokio::test]
async fn a_paused_leader_is_deposed_and_steps_down_when_it_resumes() {
    let mut tc = TestCluster::builder().queue("in", 4).coordinators(2).runners(&["r1", "r2"]).start().await.expect("cluster");
    let mut c = tc.client();
    wait_for_async(LONG, "2 slices each", || async {
        let h = holdings(&mut c.clone(), "t", "in").await;
        h.len() == 2 && h.values().all(|v| v.len() == 2)
    })
    .await
    .expect("balanced");
    let first = leader(&mut c, "t").await.expect("a leader");
    tc.coordinator(&first).proc.signal(Signal::SIGSTOP).expect("SIGSTOP");
    wait_for_async(LONG, "the standby to lead", || async { leader(&mut c.clone(), "t").await.is_some_and(|l| l != first) }).await.expect("takeover");
    // The world changes while the old leader sleeps: r2 dies.
    tc.runner_mut("r2").kill();
    wait_for_async(LONG, "r1 holds all 4 slices", || async { holdings(&mut c.clone(), "t", "in").await.get("r1").is_some_and(|v| v.len() == 4) })
        .await
        .expect("new leader reassigned");
    let paused = &tc.coordinator(&first).proc;
    paused.signal(Signal::SIGCONT).expect("SIGCONT");
    wait_for(LONG, "the old leader to step down", || paused.log().contains("stepped down as leader")).expect("stepped down");
    let h = holdings(&mut c, "t", "in").await;
    assert_eq!(h.get("r1").map(Vec::len), Some(4), "the deposed leader changed nothing: {h:?}");
    assert_ne!(leader(&mut c, "t").await.as_deref(), Some(first.as_str()));
}

#[tokio::test]
async fn a_cordoned_node_hands_off_and_one_that_will_not_release_is_fenced() {
    let mut tc = TestCluster::builder()
        .queue("in", 2)
        .coordinators(1)
        .coordinator_args(&["--revoke-deadline", "2s"])
        // "stuck" never finishes its entry and would wait 10 minutes to drain.
        .runner_with("stuck", &["--lease-ttl", "6s", "--drain-timeout", "600s"], &[("QSLICE_TEST_DELAY", "600")])
        .start()
        .await
        .expect("cluster");
    let (spool, mut c) = (tc.spool().clone(), tc.client());
    wait_for_async(LONG, "stuck holds both slices", || async { holdings(&mut c.clone(), "t", "in").await.get("stuck").is_some_and(|v| v.len() == 2) }).await.expect("assigned");
    let name = spool.queue("in").enqueue_in_slice(b"m", 0, 2).expect("enqueue").filebase;
    wait_for_async(LONG, "stuck to start the entry", || async { !spool.records().is_empty() }).await.expect("busy");
    tc.start_runner("ok").expect("runner");
    let keys = qslice_proto::keys::Keys::new("t").expect("keys");
    let cordon = Cordon { v: RECORD_VERSION, reason: "maintenance".into(), since_unix_ms: 0 };
    c.put(keys.cordon("stuck"), cordon.encode(), None).await.expect("cordon");
    let cordoned = Instant::now();
    // While the slices are held back after the revoke, qslicectl says so.
    let admin = tc.coordinator("c1").admin.clone();
    let status = || {
        let out = std::process::Command::new(qslice_tests::qslice_bin("qslicectl").expect("built"))
            .args(["--coordinator", &admin, "status", "--slices"])
            .output()
            .expect("run qslicectl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_for(LONG, "qslicectl status showing the slices held back after stuck's revoke", || status().contains("(held: stuck's lease revoked)")).expect("held shown");
    wait_for_async(LONG, "ok to hold both slices", || async { holdings(&mut c.clone(), "t", "in").await.get("ok").is_some_and(|v| v.len() == 2) }).await.expect("moved");
    // "stuck" renews its lease all along: only the revoke ends its claims, and the slices
    // are held back for its 6 s TTL after it, until its fence has surely expired.
    println!("cordon -> ok holds both slices after {:?} (revoke deadline 2 s, hold 6 s)", cordoned.elapsed());
    let leader = tc.coordinator("c1").proc.log();
    assert!(leader.contains("lease revoked; its slices and singletons are held back"), "the leader fenced stuck:\n{leader}");
    wait_for_async(LONG, "ok to finish the entry stuck was holding", || async { spool.records().iter().any(|r| r.what == "end" && r.node == "ok" && r.filebase == name) })
        .await
        .expect("recovered");
    let stuck = tc.runner("stuck");
    assert!(stuck.log().contains("fenced"), "the stuck runner noticed it was fenced:\n{}", stuck.log());
}

#[tokio::test]
async fn maintenance_freezes_every_move_except_orphan_takeover() {
    let mut tc = TestCluster::builder().queue("in", 6).coordinators(1).runners(&["r1", "r2"]).start().await.expect("cluster");
    let mut c = tc.client();
    wait_for_async(LONG, "3 slices each", || async {
        let h = holdings(&mut c.clone(), "t", "in").await;
        h.len() == 2 && h.values().all(|v| v.len() == 3)
    })
    .await
    .expect("balanced");
    let keys = qslice_proto::keys::Keys::new("t").expect("keys");
    let on = Maintenance { v: RECORD_VERSION, on: true, since_unix_ms: 0 };
    c.put(keys.maintenance(), on.encode(), None).await.expect("maintenance on");
    let r2_slices = holdings(&mut c, "t", "in").await["r2"].clone();
    // A joiner gets nothing by balancing; a death still has its orphans taken over.
    tc.start_runner("r3").expect("runner");
    tc.runner_mut("r1").kill();
    wait_for_async(LONG, "r1's orphans taken over", || async {
        let h = holdings(&mut c.clone(), "t", "in").await;
        !h.contains_key("r1") && total(&h) == 6
    })
    .await
    .expect("orphans covered");
    let h = holdings(&mut c, "t", "in").await;
    // r1's leash revokes its lease at once, so its orphans may go to r2 before r3 has
    // registered: r2 may gain slices, but keeps every one it had.
    assert!(r2_slices.iter().all(|s| h["r2"].contains(s)), "nothing moved away from a live node in maintenance: {h:?} (r2 had {r2_slices:?})");
    let off = Maintenance { v: RECORD_VERSION, on: false, since_unix_ms: 0 };
    c.put(keys.maintenance(), off.encode(), None).await.expect("maintenance off");
    wait_for_async(LONG, "balance resumes: 3 each on r2 and r3", || async {
        let h = holdings(&mut c.clone(), "t", "in").await;
        h.get("r2").is_some_and(|v| v.len() == 3) && h.get("r3").is_some_and(|v| v.len() == 3)
    })
    .await
    .expect("rebalanced");
}
