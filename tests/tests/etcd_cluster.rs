//! qslice on a 3-member etcd cluster: the harness, member failures with entries flowing
//! (no false failover on an etcd leader change, nothing lost, no stale epoch), and quorum
//! loss (runners fence themselves, everything resumes when quorum returns).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qslice_tests::checker::{check, Disruption};
use qslice_tests::cluster::{claims, client_at, fence_times};
use qslice_tests::etcd_cluster::EtcdCluster;
use qslice_tests::now_ns;
use qslice_tests::testcluster::{Ready, TestCluster};
use qslice_tests::wait_for_async;

const LONG: Duration = Duration::from_secs(90);
const SLICES: u32 = 8;

#[test]
fn the_cluster_harness_elects_a_leader_again_after_a_member_dies() {
    let mut etcd = EtcdCluster::start(3, None).expect("3 members");
    let first = etcd.wait_leader(Duration::from_secs(30)).expect("a leader");
    etcd.stop(first);
    let second = etcd.wait_leader(Duration::from_secs(30)).expect("a new leader");
    assert_ne!(first, second);
    etcd.restart(first).expect("the old leader rejoins");
    etcd.pause(second).expect("pause");
    let third = etcd.wait_leader(Duration::from_secs(30)).expect("a leader while one is frozen");
    assert_ne!(third, second);
    etcd.resume(second).expect("resume");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qslice_rides_out_member_failures_and_fences_on_quorum_loss() {
    let mut etcd = EtcdCluster::start(3, None).expect("3 members");
    let endpoints = etcd.endpoints_flag();
    let ttl = ["--lease-ttl", "3s"];
    let tc = TestCluster::builder()
        .etcd_endpoints(&endpoints)
        .queue("in", SLICES)
        .coordinators(2)
        .coordinator_args(&ttl)
        .runner_args(&ttl)
        .runner_env(&[("QSLICE_TEST_DELAY", "0.01")])
        .runners(&["r1", "r2", "r3"])
        .ready(Ready::Claimed)
        .ready_timeout(LONG)
        .start()
        .await
        .expect("cluster");
    let (spool, mut c, runners) = (tc.spool(), tc.client(), tc.runners());
    wait_for_async(LONG, "all slices claimed", || async { claims(&mut c.clone(), "t", "in").await.is_ok_and(|m| m.len() == SLICES as usize) }).await.expect("claimed");

    let enqueued = Arc::new(Mutex::new(BTreeMap::<String, (u128, u32)>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (q, enqueued, stop) = (spool.queue("in"), enqueued.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let at = now_ns();
                let name = q.enqueue(format!("m{i}").as_bytes()).expect("enqueue");
                enqueued.lock().expect("lock").insert(name.filebase.clone(), (at, name.slice(SLICES)));
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let finished_now = || spool.finished().len();
    let progress = |before: usize| async move { wait_for_async(LONG, "entries keep finishing", || async { finished_now() >= before + 50 }).await };

    // 1. The etcd leader dies: processing goes on through the others, and no slice is
    //    reassigned (same claims, same epochs) merely because etcd changed leader.
    progress(0).await.expect("flowing");
    let epochs_before = claims(&mut c, "t", "in").await.expect("claims");
    let leader = etcd.wait_leader(Duration::from_secs(30)).expect("leader");
    etcd.stop(leader);
    etcd.wait_leader(Duration::from_secs(30)).expect("new etcd leader");
    progress(finished_now()).await.expect("processing through the remaining members");
    let mut c = client_at(&etcd.endpoints()).await.expect("client");
    let epochs_after = claims(&mut c, "t", "in").await.expect("claims");
    assert_eq!(epochs_before, epochs_after, "an etcd leader change caused no failover");

    // 2. Then a follower dies too: quorum is lost. Runners fence themselves.
    let follower = (0..3).find(|i| *i != leader && etcd.leader() != Some(*i)).expect("a follower");
    let quorum_lost_ns = now_ns();
    etcd.stop(follower);
    qslice_tests::wait_for(LONG, "every runner to fence itself without quorum", || runners.values().all(|r| r.log().contains("fenced"))).expect("fenced");

    // 3. Both come back: everything resumes.
    etcd.restart(leader).expect("member back");
    etcd.restart(follower).expect("member back");
    etcd.wait_leader(Duration::from_secs(30)).expect("quorum again");
    progress(finished_now()).await.expect("processing resumes");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().expect("writer");
    let total = enqueued.lock().expect("lock").len();
    wait_for_async(LONG, "every entry finished", || async { spool.finished().len() >= total }).await.expect("drained");

    // A runner's fence kills its in-flight work (the next owner recovers it): each fence is
    // a disruption of that runner.
    let mut disruptions = vec![Disruption { node: "*".into(), at_ns: quorum_lost_ns, what: "quorum lost".into() }];
    for (id, r) in runners {
        for at_ns in fence_times(&r.log()) {
            disruptions.push(Disruption { node: id.clone(), at_ns, what: "fence".into() });
        }
    }
    let report = check(&enqueued.lock().expect("lock"), &spool.records(), &BTreeSet::new(), &[], &disruptions);
    eprintln!("member failures: {}", report.summary());
    assert!(report.ok(), "{}", report.summary());
}
