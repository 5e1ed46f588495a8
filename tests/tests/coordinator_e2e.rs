//! The coordinator with real runners and a real etcd: balanced assignment, failover,
//! leader takeover, fenced hand-off, maintenance.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use qslice_proto::records::{Cordon, Maintenance, Record, RECORD_VERSION};
use qslice_tests::cluster::{client, holdings, leader, put_queue, start_coordinator, start_runner, Spool};
use qslice_tests::wait_for_async;
use qslice_tests::Etcd;

const LONG: Duration = Duration::from_secs(60);

fn total(h: &BTreeMap<String, Vec<u32>>) -> usize {
    h.values().map(Vec::len).sum()
}

#[tokio::test]
async fn slices_are_spread_evenly_and_a_dead_runners_slices_are_taken_over() {
    let etcd = Etcd::start().expect("etcd");
    let spool = Spool::new(&["in"]).expect("spool");
    let mut c = client(&etcd).await.expect("client");
    put_queue(&mut c, "t", "in", 12).await.expect("queue");
    let _co = start_coordinator(&etcd, &spool, "c1", "t", &[]).expect("coordinator");
    let mut runners: BTreeMap<String, qslice_tests::Proc> = BTreeMap::new();
    for r in ["r1", "r2", "r3"] {
        runners.insert(r.into(), start_runner(&etcd, &spool, r, "t", &[], &[]).expect("runner"));
    }
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

    runners.get_mut("r1").expect("r1").kill();
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
    let etcd = Etcd::start().expect("etcd");
    let spool = Spool::new(&["in"]).expect("spool");
    let mut c = client(&etcd).await.expect("client");
    put_queue(&mut c, "t", "in", 4).await.expect("queue");
    let mut coordinators: BTreeMap<String, qslice_tests::Proc> = BTreeMap::new();
    for id in ["c1", "c2"] {
        coordinators.insert(id.into(), start_coordinator(&etcd, &spool, id, "t", &[]).expect("coordinator").proc);
    }
    let _r1 = start_runner(&etcd, &spool, "r1", "t", &[], &[]).expect("runner");
    wait_for_async(LONG, "r1 holds all 4 slices", || async { holdings(&mut c.clone(), "t", "in").await.get("r1").is_some_and(|v| v.len() == 4) })
        .await
        .expect("assigned");
    let first = leader(&mut c, "t").await.expect("a leader");
    coordinators.get_mut(&first).expect("leader process").kill();
    let killed = Instant::now();
    wait_for_async(LONG, "the standby to lead", || async { leader(&mut c.clone(), "t").await.is_some_and(|l| l != first) }).await.expect("takeover");
    eprintln!("leader takeover after kill -9: {:?} (lease TTL 2 s)", killed.elapsed());
    // The new leader acts: a joining runner gets its share.
    let _r2 = start_runner(&etcd, &spool, "r2", "t", &[], &[]).expect("runner");
    wait_for_async(LONG, "r2 gets 2 of the 4 slices", || async {
        let h = holdings(&mut c.clone(), "t", "in").await;
        h.get("r1").is_some_and(|v| v.len() == 2) && h.get("r2").is_some_and(|v| v.len() == 2)
    })
    .await
    .expect("new leader balances");
}

#[tokio::test]
async fn a_paused_leader_is_deposed_and_steps_down_when_it_resumes() {
    let etcd = Etcd::start().expect("etcd");
    let spool = Spool::new(&["in"]).expect("spool");
    let mut c = client(&etcd).await.expect("client");
    put_queue(&mut c, "t", "in", 4).await.expect("queue");
    let mut coordinators: BTreeMap<String, qslice_tests::Proc> = BTreeMap::new();
    for id in ["c1", "c2"] {
        coordinators.insert(id.into(), start_coordinator(&etcd, &spool, id, "t", &[]).expect("coordinator").proc);
    }
    let _r1 = start_runner(&etcd, &spool, "r1", "t", &[], &[]).expect("runner");
    let mut r2 = start_runner(&etcd, &spool, "r2", "t", &[], &[]).expect("runner");
    wait_for_async(LONG, "2 slices each", || async {
        let h = holdings(&mut c.clone(), "t", "in").await;
        h.len() == 2 && h.values().all(|v| v.len() == 2)
    })
    .await
    .expect("balanced");
    let first = leader(&mut c, "t").await.expect("a leader");
    let paused = coordinators.get(&first).expect("leader process");
    paused.signal(Signal::SIGSTOP).expect("SIGSTOP");
    wait_for_async(LONG, "the standby to lead", || async { leader(&mut c.clone(), "t").await.is_some_and(|l| l != first) }).await.expect("takeover");
    // The world changes while the old leader sleeps: r2 dies.
    r2.kill();
    wait_for_async(LONG, "r1 holds all 4 slices", || async { holdings(&mut c.clone(), "t", "in").await.get("r1").is_some_and(|v| v.len() == 4) })
        .await
        .expect("new leader reassigned");
    paused.signal(Signal::SIGCONT).expect("SIGCONT");
    qslice_tests::wait_for(LONG, "the old leader to step down", || paused.log().contains("stepped down as leader")).expect("stepped down");
    let h = holdings(&mut c, "t", "in").await;
    assert_eq!(h.get("r1").map(Vec::len), Some(4), "the deposed leader changed nothing: {h:?}");
    assert_ne!(leader(&mut c, "t").await.as_deref(), Some(first.as_str()));
}

#[tokio::test]
async fn a_cordoned_node_hands_off_and_one_that_will_not_release_is_fenced() {
    let etcd = Etcd::start().expect("etcd");
    let spool = Spool::new(&["in"]).expect("spool");
    let mut c = client(&etcd).await.expect("client");
    put_queue(&mut c, "t", "in", 2).await.expect("queue");
    let _co = start_coordinator(&etcd, &spool, "c1", "t", &["--revoke-deadline", "2s"]).expect("coordinator");
    // "stuck" never finishes its entry and would wait 10 minutes to drain.
    let stuck = start_runner(&etcd, &spool, "stuck", "t", &["--lease-ttl", "30s", "--drain-timeout", "600s"], &[("QSLICE_TEST_DELAY", "600")]).expect("runner");
    wait_for_async(LONG, "stuck holds both slices", || async { holdings(&mut c.clone(), "t", "in").await.get("stuck").is_some_and(|v| v.len() == 2) })
        .await
        .expect("assigned");
    let name = spool.queue("in").enqueue_in_slice(b"m", 0, 2).expect("enqueue").filebase;
    wait_for_async(LONG, "stuck to start the entry", || async { !spool.records().is_empty() }).await.expect("busy");
    let _ok = start_runner(&etcd, &spool, "ok", "t", &[], &[]).expect("runner");
    let keys = qslice_proto::keys::Keys::new("t").expect("keys");
    let cordon = Cordon { v: RECORD_VERSION, reason: "maintenance".into(), since_unix_ms: 0 };
    c.put(keys.cordon("stuck"), cordon.encode(), None).await.expect("cordon");
    let cordoned = Instant::now();
    wait_for_async(LONG, "ok to hold both slices", || async { holdings(&mut c.clone(), "t", "in").await.get("ok").is_some_and(|v| v.len() == 2) })
        .await
        .expect("moved");
    assert!(cordoned.elapsed() < Duration::from_secs(30), "the move completed by fencing, not by the 30 s TTL");
    wait_for_async(LONG, "ok to finish the entry stuck was holding", || async {
        spool.records().iter().any(|r| r.what == "end" && r.node == "ok" && r.filebase == name)
    })
    .await
    .expect("recovered");
    assert!(stuck.log().contains("fenced"), "the stuck runner noticed it was fenced:\n{}", stuck.log());
}

#[tokio::test]
async fn maintenance_freezes_every_move_except_orphan_takeover() {
    let etcd = Etcd::start().expect("etcd");
    let spool = Spool::new(&["in"]).expect("spool");
    let mut c = client(&etcd).await.expect("client");
    put_queue(&mut c, "t", "in", 6).await.expect("queue");
    let _co = start_coordinator(&etcd, &spool, "c1", "t", &[]).expect("coordinator");
    let mut r1 = start_runner(&etcd, &spool, "r1", "t", &[], &[]).expect("runner");
    let _r2 = start_runner(&etcd, &spool, "r2", "t", &[], &[]).expect("runner");
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
    let _r3 = start_runner(&etcd, &spool, "r3", "t", &[], &[]).expect("runner");
    r1.kill();
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
