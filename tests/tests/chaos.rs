//! Chaos: 3 runners and 2 coordinators on one etcd with a steady stream of entries, while
//! runners and coordinators are killed with SIGKILL and restarted, a runner is frozen past
//! its lease TTL, and etcd restarts. At the end the invariant checker must pass.
//!
//! The second run does the same with the runners on a faulty file system (a FUSE mount of
//! the spool, `qslice_testbeds::faultfs`): renames that are done but report ENOENT, stale
//! listings, EMFILE/EIO/ESTALE on open, renames held for a second. Nothing may be lost or
//! quarantined, and once it is quiet no `.bak` may be left.
//!
//! QSLICE_CHAOS_SECS sets the chaos duration (default 60, which keeps the test under three
//! minutes); QSLICE_CHAOS_SEED replays a run (the seed is printed).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use qslice_testbeds::faultfs::{Fault, FaultFs, Match, Op, OpenErrno};
use qslice_tests::checker::{check, observe_grants, Disruption};
use qslice_tests::cluster::fence_times;
use qslice_tests::cluster::Spool;
use qslice_tests::now_ns;
use qslice_tests::testcluster::{Ready, TestCluster};
use qslice_tests::{wait_for_async, Proc};
use rand::{Rng, SeedableRng};

const SLICES: u32 = 8;

fn names_in(dir: &std::path::Path) -> BTreeSet<String> {
    std::fs::read_dir(dir).map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().split('.').take(2).collect::<Vec<_>>().join(".")).collect()).unwrap_or_default()
}

/// A runner's fence kills its in-flight work: each fence in its log is a disruption.
fn fences(disruptions: &mut Vec<Disruption>, node: &str, runner: &Proc) {
    for at_ns in fence_times(&runner.log()) {
        disruptions.push(Disruption { node: node.into(), at_ns, what: "fence".into() });
    }
}

/// The faults of the faulty-spool run, one of each kind first, then at random.
fn a_fault(rng: &mut impl Rng, round: usize) -> Fault {
    let errno = [OpenErrno::Emfile, OpenErrno::Eio, OpenErrno::Estale][rng.gen_range(0..3)];
    match if round < 4 { round } else { rng.gen_range(0..4) } {
        // A dequeue's rename done but reported ENOENT: the runner thinks another took it,
        // and the .bak is stranded until the owner's periodic recovery.
        0 => Fault::RenameThenEnoent(Match::suffix(".pck").times(3)),
        1 => Fault::OpenError { errno, matching: Match::suffix(".bak").times(4) },
        2 => Fault::CachedListings { ttl: Duration::from_millis(rng.gen_range(300..1500)) },
        _ => Fault::Block { op: Op::Rename, duration: Duration::from_millis(rng.gen_range(300..1200)), matching: Match::suffix(".pck").times(1) },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariants_hold_under_kills_pauses_and_etcd_restarts() {
    chaos(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariants_hold_on_a_faulty_spool_under_kills_pauses_and_etcd_restarts() {
    chaos(true).await;
}

async fn chaos(faulty: bool) {
    let secs: u64 = std::env::var("QSLICE_CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let seed: u64 = std::env::var("QSLICE_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("chaos: {secs} s, seed {seed} (QSLICE_CHAOS_SEED={seed} replays it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let node_ids = ["r1", "r2", "r3"];
    let spool = Spool::new(&["in"]).expect("spool");
    // Declared before the cluster, so it is unmounted after the runners stop.
    let faultfs = if faulty {
        let mnt = spool.scratch("mnt");
        std::fs::create_dir_all(&mnt).expect("mount point");
        let fs = FaultFs::mount(&spool.root(), &mnt).expect("mount the faulty file system");
        spool.serve_runners_from(fs.mountpoint()).expect("runners on the mount");
        Some(fs)
    } else {
        None
    };
    // A stranded .bak is recovered once older than the handler timeout.
    let handler_timeout = if faulty { "5s" } else { "300s" };
    // Not waited for: the observer below is to see the first claims too.
    let mut tc = TestCluster::builder()
        .spool(spool.clone())
        .queue("in", SLICES)
        .coordinators(2)
        .runner_env(&[("QSLICE_TEST_DELAY", "0.02"), ("QSLICE_HANDLER_TIMEOUT", handler_timeout)])
        .runners(&node_ids)
        .ready(Ready::Started)
        .start()
        .await
        .expect("cluster");
    let c = tc.client();

    // The observer records every claim grant it sees (a claim key created).
    let (grants, observer) = observe_grants(c.clone(), "t");

    let writer = Writer::start(&spool);
    let enqueued = writer.enqueued.clone();

    let mut disruptions: Vec<Disruption> = Vec::new();
    let mut etcd_restarts = 0;
    let started = Instant::now();
    let mut round = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(1500..3500))).await;
        if let Some(fs) = &faultfs {
            if round >= 4 && rng.gen_range(0..4) == 0 {
                fs.clear().expect("clear faults");
                eprintln!("chaos: faults cleared");
            } else {
                let fault = a_fault(&mut rng, round);
                eprintln!("chaos: fault {fault:?}");
                fs.set(fault).expect("set a fault");
            }
        }
        round += 1;
        disrupt(&mut tc, &mut rng, &node_ids, &mut disruptions, &mut etcd_restarts).await;
    }
    writer.stop();
    let fired = faultfs.as_ref().map(|fs| fs.counters().expect("fault counters"));
    if let Some(fs) = &faultfs {
        fs.clear().expect("clear faults");
    }
    let q = spool.queue("in");
    let bad = spool.root().join("bad");
    settled(&spool, &enqueued).await;
    observer.abort();
    for id in node_ids {
        fences(&mut disruptions, id, tc.runner(id));
    }
    let quarantined = names_in(q.quarantine_dir());
    assert!(quarantined.is_empty(), "every entry was good mail; a fault of the moment must not quarantine it: {quarantined:?}");
    if let Some(fired) = fired {
        eprintln!("faults fired: {fired:?}");
        assert!(fired.renames_then_enoent > 0 && fired.open_errors > 0, "the faults reached the runners: {fired:?}");
    }

    let mut preserved = names_in(&bad);
    preserved.extend(quarantined);
    let report = check(&enqueued.lock().expect("enqueued"), &spool.records(), &preserved, &grants.lock().expect("grants"), &disruptions);
    eprintln!("chaos report: {}", report.summary());
    eprintln!("disruptions: {}", disruptions.iter().map(|d| format!("{} {}", d.what, d.node)).collect::<Vec<_>>().join(", "));
    assert!(report.enqueued > 100, "the stream kept flowing");
    assert!(report.lost.is_empty(), "lost: {:?}", report.lost);
    assert!(report.stale_starts.is_empty(), "started under a stale epoch: {:?}", report.stale_starts);
    if !report.unexplained_duplicates.is_empty() {
        explain_duplicates(&spool, &report.unexplained_duplicates, &disruptions, &node_ids);
    }
    assert!(report.unexplained_duplicates.is_empty(), "duplicates with no kill or fence to explain them: {:?}", report.unexplained_duplicates);
}

/// A steady stream of entries into `in`, one every 15 ms, each recorded with its time and
/// slice.
struct Writer {
    enqueued: Arc<Mutex<BTreeMap<String, (u128, u32)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Writer {
    fn start(spool: &Spool) -> Writer {
        let enqueued = Arc::new(Mutex::new(BTreeMap::<String, (u128, u32)>::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (q, enqueued, stop) = (spool.queue("in"), enqueued.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let at = now_ns();
                    let name = q.enqueue(format!("message {i}").as_bytes()).expect("enqueue");
                    enqueued.lock().expect("enqueued").insert(name.filebase.clone(), (at, name.slice(SLICES)));
                    i += 1;
                    std::thread::sleep(Duration::from_millis(15));
                }
            })
        };
        Writer { enqueued, stop, thread }
    }

    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().expect("writer");
    }
}

/// One disruption drawn at random: a runner killed and restarted, a coordinator killed
/// and restarted, a runner frozen past its TTL, or (twice at most) an etcd restart.
async fn disrupt(tc: &mut TestCluster, rng: &mut impl Rng, node_ids: &[&str], disruptions: &mut Vec<Disruption>, etcd_restarts: &mut usize) {
    match rng.gen_range(0..10) {
        0..=3 => {
            let id = node_ids[rng.gen_range(0..node_ids.len())];
            fences(disruptions, id, tc.runner(id));
            tc.runner_mut(id).kill();
            disruptions.push(Disruption { node: id.into(), at_ns: now_ns(), what: "kill -9".into() });
            eprintln!("chaos: kill -9 {id}");
            tokio::time::sleep(Duration::from_millis(rng.gen_range(200..2500))).await;
            tc.start_runner(id).expect("restart runner");
        }
        4..=5 => {
            let id = ["c1", "c2"][rng.gen_range(0..2)];
            tc.coordinator_mut(id).proc.kill();
            eprintln!("chaos: kill -9 {id}");
            tokio::time::sleep(Duration::from_millis(rng.gen_range(200..2500))).await;
            tc.start_coordinator(id).expect("restart coordinator");
        }
        6..=8 => {
            let id = node_ids[rng.gen_range(0..node_ids.len())];
            let r = tc.runner(id);
            r.signal(Signal::SIGSTOP).expect("SIGSTOP");
            disruptions.push(Disruption { node: id.into(), at_ns: now_ns(), what: "SIGSTOP".into() });
            eprintln!("chaos: SIGSTOP {id} past its 2 s TTL");
            tokio::time::sleep(Duration::from_millis(rng.gen_range(2600..4000))).await;
            r.signal(Signal::SIGCONT).expect("SIGCONT");
        }
        _ if *etcd_restarts < 2 => {
            disruptions.push(Disruption { node: "*".into(), at_ns: now_ns(), what: "etcd restart".into() });
            eprintln!("chaos: etcd restart");
            tc.etcd_mut().restart().expect("etcd restarts");
            *etcd_restarts += 1;
        }
        _ => {}
    }
}

/// Waits until every entry enqueued is finished, in bad/ or quarantined, and then, once
/// quiet, until nothing is left in flight (stranded .bak files recovered too).
async fn settled(spool: &Spool, enqueued: &Mutex<BTreeMap<String, (u128, u32)>>) {
    let total = enqueued.lock().expect("enqueued").len();
    let q = spool.queue("in");
    let bad = spool.root().join("bad");
    wait_for_async(Duration::from_secs(120), "every entry finished or preserved", || async {
        let finished = spool.finished();
        let preserved = names_in(&bad);
        let quarantined = names_in(q.quarantine_dir());
        enqueued.lock().expect("enqueued").keys().all(|e| finished.contains_key(e) || preserved.contains(e) || quarantined.contains(e))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {total} enqueued, {} finished", spool.finished().len()));
    wait_for_async(Duration::from_secs(60), "no .bak left in the queue", || async {
        std::fs::read_dir(q.dir()).map(|rd| rd.flatten().all(|e| !e.file_name().to_string_lossy().ends_with(".bak"))).unwrap_or(false)
    })
    .await
    .expect("no .bak left");
}

/// What the records, the disruptions and the runners' logs say of duplicates the checker
/// could not explain.
fn explain_duplicates(spool: &Spool, duplicates: &[String], disruptions: &[Disruption], node_ids: &[&str]) {
    let records = spool.records();
    for entry in duplicates {
        for r in records.iter().filter(|r| &r.filebase == entry) {
            eprintln!("  {entry}: {} on {} epoch {} slice {} at {}", r.what, r.node, r.epoch, r.slice, r.at_ns);
        }
    }
    for d in disruptions {
        eprintln!("  disruption {} {} at {}", d.what, d.node, d.at_ns);
    }
    for id in node_ids {
        eprintln!("--- {id} log ---\n{}", qslice_tests::tail(&spool.scratch(&format!("{id}.log")), 60));
    }
}
