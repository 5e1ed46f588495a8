//! qslice on real NFS: qslice-runners in QEMU guests running Debian's kernel, each a
//! Linux NFS client of an nfs-ganesha export holding the spool; etcd and a coordinator on
//! the host side of the test's own network namespace. Entries are written through NFS
//! too (a writer in a guest). These tests need QEMU, ganesha and Debian's kernel package
//! (tests/run.sh installs them) and never skip.
//!
//! Each test runs on the test's own thread (not a runtime's): the bed's QEMUs and server
//! die with the thread that started them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use qslice_testbeds::nfs::{enter_private_network, BedOptions, GuestImage, NfsBed, GATEWAY};
use qslice_tests::checker::observe_grants;
use qslice_tests::checker::{check, Disruption};
use qslice_tests::cluster::{claims, Rec};
use qslice_tests::nfs::{
    baks_in, enqueued, enqueued_path, fences, file_bases_in, heartbeat_script, records, records_path, recovered_at, runner_script, writer_script, Seen, Tail, GUEST_TTL,
};
use qslice_tests::site::{SiteOptions, WholeSite};
use qslice_tests::testcluster::{Ready, TestCluster};
use qslice_tests::{now_ns, qslicectl};

/// Generous bound for what emulated guests do in seconds: with CPU hogs beside the suite
/// on two cores, a guest runs some ten times slower than on an idle machine (a Mailman
/// slice runner takes minutes to start instead of 35 s).
const LONG: Duration = Duration::from_secs(600);

/// The mount options qslice recommends (docs/OPERATIONS.md, "The spool over NFS").
const RECOMMENDED: &str = "vers=4.1,lookupcache=none";

/// Linux's defaults for NFSv4.1.
const DEFAULTS: &str = "vers=4.1";

const SLICES: u32 = 6;

/// Each handler takes half a second, so that a guest has entries in flight when it dies.
const HANDLER_DELAY: &str = "QSLICE_TEST_DELAY=0.5";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// Polls `cond` every 100 ms until it holds; panics with `what` after `limit`.
async fn until<F: FnMut() -> bool>(limit: Duration, what: &str, mut cond: F) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {} s waiting for {what}", limit.as_secs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Prints what `logs` returns if the test panics while this lives (a bounded wait that
/// timed out): the runners' and the coordinator's last log lines, to tell a guest starved
/// on a loaded machine from a stall.
struct LogsOnPanic<F: Fn() -> String>(F);

impl<F: Fn() -> String> Drop for LogsOnPanic<F> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", (self.0)());
        }
    }
}

/// The last `n` lines of `text`, under a heading.
fn last_lines(heading: &str, text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    format!("--- {heading} (last {} of {} lines)\n{}\n", n.min(lines.len()), lines.len(), lines[lines.len().saturating_sub(n)..].join("\n"))
}

/// Slices per node from the claims of `in`.
async fn holders(client: &mut etcd_client::Client) -> BTreeMap<String, Vec<u32>> {
    let mut out: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (slice, (node, _)) in claims(client, "t", "in").await.unwrap_or_default() {
        out.entry(node).or_default().push(slice);
    }
    out
}

async fn until_held(client: &mut etcd_client::Client, what: &str, cond: impl Fn(&BTreeMap<String, Vec<u32>>) -> bool) -> BTreeMap<String, Vec<u32>> {
    let deadline = Instant::now() + LONG;
    loop {
        let h = holders(client).await;
        if cond(&h) {
            return h;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; claims: {h:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether every entry the writer logged has an end record or is preserved (bad/ or the
/// quarantine under `spool`): a wait that ends on a preserved entry too, so that the
/// checker, not a timeout, says what went wrong.
fn every_entry_processed(tail: &Tail, spool: &Path) -> bool {
    let seen = tail.seen();
    let mut done: BTreeSet<String> = records(&seen).into_iter().filter(|r| r.rec.what == "end").map(|r| r.rec.filebase).collect();
    done.extend(preserved_in(spool));
    enqueued(&seen, SLICES).keys().all(|k| done.contains(k))
}

/// The entries preserved under `spool`: in bad/ or in the quarantine of `in`.
fn preserved_in(spool: &Path) -> BTreeSet<String> {
    let mut preserved = file_bases_in(&spool.join("bad"));
    preserved.extend(file_bases_in(&spool.join(".qslice/quarantine/in")));
    preserved
}

#[test]
fn three_guests_on_nfs_with_the_recommended_options_lose_nothing_through_a_runner_kill_and_a_guest_death() {
    failover(RECOMMENDED);
}

#[test]
fn three_guests_on_nfs_with_default_mount_options_lose_nothing_through_a_runner_kill_and_a_guest_death() {
    failover(DEFAULTS);
}

/// Three runners in three guests with the exec handler, a stream of entries written
/// through NFS, kill -9 of one runner (restarted once its slices moved), then the death of
/// a whole guest (its QEMU killed): every entry processed, none twice but those in flight
/// at a disruption, no start under a stale epoch, and every `.bak` the dead guest left
/// recovered at its new owner's claim (how long after the death is printed: a figure).
fn failover(mount: &str) {
    let image = GuestImage::for_this_target().expect("the guest image");
    enter_private_network().expect("a network namespace of the test's own");
    let mut bed = NfsBed::start(&image, &BedOptions::new(3, mount)).expect("the NFS bed");
    runtime().block_on(async {
        let tc = TestCluster::builder().queue("in", SLICES).coordinators(1).ready(Ready::Registered).start().await.expect("etcd and a coordinator");
        let mut client = tc.client();
        let port = tc.etcd().client_port();
        let spool = bed.export().join("spool");
        let queue_dir = spool.join("in");
        let (rc, out) = bed.guest("g3").run(&format!("mkdir -p {}\n", queue_dir.display()), LONG).expect("mkdir over NFS");
        assert_eq!(rc, 0, "mkdir of the queue over NFS: {out}");

        let mut runners = BTreeMap::new();
        for g in bed.guests() {
            runners.insert(g.name().to_owned(), g.spawn(&runner_script(g, "t", port, &spool, HANDLER_DELAY, "")).expect("start a runner"));
        }
        let (grants, observer) = observe_grants(client.clone(), "t");
        until_held(&mut client, "every slice claimed, two per guest", |h| h.len() == 3 && h.values().all(|s| s.len() == 2)).await;

        let mut files = vec![enqueued_path(bed.guest("g3"))];
        files.extend(bed.guests().iter().map(records_path));
        let mut runner_log_files: Vec<(usize, String)> = Vec::new();
        for (node, r) in &runners {
            runner_log_files.push((files.len(), node.clone()));
            files.push(r.log_path());
        }
        let tail = Tail::follow(files);
        let count = 90;
        let writer = bed.guest("g3").spawn(&writer_script(bed.guest("g3"), &queue_dir, count, Duration::from_millis(200))).expect("start the writer");
        let written = |n: usize| enqueued(&tail.seen(), SLICES).len() >= n;
        until(LONG, "30 entries written", || written(30)).await;

        // kill -9 of g1's runner (and its handlers: its process group), then its restart.
        let mut disruptions = Vec::new();
        runners["g1"].signal("KILL").expect("kill g1's runner");
        until(LONG, "g1's runner killed", || runners["g1"].signal_sent()).await;
        disruptions.push(Disruption { node: "g1".into(), at_ns: now_ns(), what: "kill -9 of the runner".into() });
        until_held(&mut client, "g1's slices taken over", |h| !h.contains_key("g1") && h.values().map(Vec::len).sum::<usize>() == SLICES as usize).await;
        let g1 = bed.guest("g1");
        runners.insert("g1".into(), g1.spawn(&runner_script(g1, "t", port, &spool, HANDLER_DELAY, "")).expect("restart g1's runner"));
        runner_log_files.push((runner_log_files.len() + 4, "g1".into()));
        tail.add(runners["g1"].log_path());
        until_held(&mut client, "g1 back with slices", |h| h.contains_key("g1") && h.len() == 3).await;

        // The death of g2: its QEMU killed at once.
        until(LONG, "60 entries written", || written(60)).await;
        let before = holders(&mut client).await;
        let g2_slices: BTreeSet<u32> = before.get("g2").cloned().unwrap_or_default().into_iter().collect();
        let g2_in_flight = || baks_in(&queue_dir).iter().any(|b| enqueued(&tail.seen(), SLICES).get(b).is_some_and(|(_, s)| g2_slices.contains(s)));
        until(LONG, "g2 with an entry in flight", g2_in_flight).await;
        bed.guest_mut("g2").kill();
        let death_ns = now_ns();
        disruptions.push(Disruption { node: "g2".into(), at_ns: death_ns, what: "guest killed".into() });
        // What g2 had in flight, as the server has it.
        let left: BTreeSet<String> = baks_in(&queue_dir);
        until_held(&mut client, "g2's slices taken over", |h| !h.contains_key("g2") && h.values().map(Vec::len).sum::<usize>() == SLICES as usize).await;

        let rc = writer.wait(LONG).expect("the writer ends");
        assert_eq!(rc, 0, "the writer failed: {}", writer.output());
        until(LONG, "every entry processed", || every_entry_processed(&tail, &spool)).await;
        observer.abort();

        let seen = tail.seen();
        let enq = enqueued(&seen, SLICES);
        assert_eq!(enq.len(), count, "the writer logged every entry");
        let recs: Vec<_> = records(&seen).into_iter().map(|r| r.rec).collect();
        let preserved = preserved_in(&spool);
        // Every fence a runner logged on a loaded machine is a disruption too.
        let runner_logs: BTreeMap<usize, String> = runner_log_files.iter().map(|(i, n)| (*i, n.clone())).collect();
        disruptions.extend(fences(&seen, &runner_logs));
        let report = check(&enq, &recs, &preserved, &grants.lock().expect("grants"), &disruptions);
        eprintln!("NFS ({mount}): {}", report.summary());
        // Each runner said what the spool is on, and warned where the options fall short.
        let log = runners["g3"].output();
        let warned = log.contains("the spool is on NFS without the options qslice recommends");
        assert_eq!(warned, mount == DEFAULTS, "g3's runner warns about the mount options only with the defaults ({mount}):\n{log}");
        assert!(warned || log.contains("spool file system") && log.contains("fstype=nfs4"), "g3's runner names the spool's NFS mount:\n{log}");
        assert!(
            report.ok(),
            "invariants broken on NFS ({mount}): {}\nlost {:?}\nstale {:?}\nunexplained {:?}",
            report.summary(),
            report.lost,
            report.stale_starts,
            report.unexplained_duplicates
        );
        // Nothing preserved: a kill and a guest's death count one recovery each, and a
        // handler stopped at a fence (emulated guests on a loaded machine fence often)
        // counts none, even when its runner learns of the fence late.
        assert_eq!(report.preserved, 0, "nothing preserved or quarantined: {preserved:?}");

        assert_recovered_at_claims(mount, &tail.seen(), &left, &enq, &g2_slices, &recs, death_ns);
        drop(tc);
    });
    drop(bed);
}

/// Every .bak the dead guest g2 left (`left`, of its slices) was recovered by its new
/// owner's claim after its death at `death_ns`, and started elsewhere.
fn assert_recovered_at_claims(mount: &str, seen: &[Seen], left: &BTreeSet<String>, enq: &BTreeMap<String, (u128, u32)>, g2_slices: &BTreeSet<u32>, recs: &[Rec], death_ns: u128) {
    let mut waits = Vec::new();
    for base in left.iter().filter(|b| enq.get(*b).is_some_and(|(_, s)| g2_slices.contains(s))) {
        let recovered = recovered_at(seen, base, death_ns).unwrap_or_else(|| panic!("{base}, left in flight by g2, was not recovered at a claim after its death"));
        let first = recs.iter().filter(|r| r.what == "start" && &r.filebase == base && r.node != "g2" && r.at_ns > death_ns).map(|r| r.at_ns).min();
        let first = first.unwrap_or_else(|| panic!("{base}, left in flight by g2, never started elsewhere"));
        waits.push((base.clone(), (recovered - death_ns) as f64 / 1e9, (first - death_ns) as f64 / 1e9));
    }
    eprintln!("NFS ({mount}): g2 held {g2_slices:?}; its .bak files, seconds from its death to their recovery and to their start elsewhere: {waits:?}");
    assert!(!waits.is_empty(), "g2 left no .bak of its slices: the test did not test the recovery");
    // Recovered by the new owner's claim (above), never by the stranded-entry check
    // (after the handler timeout): the claim's listing saw the dead guest's last
    // renames. How long after the death is a figure (TTL + 1 s on real hosts; emulated
    // guests on a loaded machine take longer), measured by `bench_failover --nfs`.
    let stranded: Vec<_> =
        seen.iter().filter(|s| s.line.contains("recovered a stranded .bak") && left.iter().any(|b| s.line.contains(&format!("entry={b}")))).map(|s| &s.line).collect();
    assert!(stranded.is_empty(), "a .bak the dead guest left was recovered as stranded, not at a claim: {stranded:?}");
    let bound = GUEST_TTL.as_secs_f64() + 1.0;
    let late = waits.iter().filter(|(_, r, _)| *r > bound).count();
    eprintln!("NFS ({mount}): {late} of {} .bak files recovered later than TTL + 1 s ({bound} s) after the death", waits.len());
}

/// A guest paused (SIGSTOP of its QEMU: a VM whose clocks may or may not move) past the
/// TTL while its runner holds slices with entries in flight, resumed once the other guest
/// claimed them: the paused guest's runner starts nothing after the new owner's claim
/// (what it had dispatched before the pause may finish), and every entry is processed.
#[test]
fn a_guest_paused_past_its_ttl_starts_nothing_on_nfs_when_it_resumes() {
    let image = GuestImage::for_this_target().expect("the guest image");
    enter_private_network().expect("a network namespace of the test's own");
    let bed = NfsBed::start(&image, &BedOptions::new(2, RECOMMENDED)).expect("the NFS bed");
    runtime().block_on(async {
        let tc = TestCluster::builder().queue("in", SLICES).coordinators(1).ready(Ready::Registered).start().await.expect("etcd and a coordinator");
        let mut client = tc.client();
        let port = tc.etcd().client_port();
        let spool = bed.export().join("spool");
        let queue_dir = spool.join("in");
        let (g1, g2) = (bed.guest("g1"), bed.guest("g2"));
        let (rc, out) = g2.run(&format!("mkdir -p {}\n", queue_dir.display()), LONG).expect("mkdir over NFS");
        assert_eq!(rc, 0, "mkdir of the queue over NFS: {out}");
        let _heartbeat = g1.spawn(&heartbeat_script()).expect("a heartbeat in g1");
        let r1 = g1.spawn(&runner_script(g1, "t", port, &spool, HANDLER_DELAY, "")).expect("start g1's runner");
        let r2 = g2.spawn(&runner_script(g2, "t", port, &spool, HANDLER_DELAY, "")).expect("start g2's runner");
        let logs = LogsOnPanic(|| {
            [("g1", r1.output()), ("g2", r2.output()), ("coordinator", tc.coordinator("c1").proc.log())].iter().map(|(h, t)| last_lines(h, t, 80)).collect::<String>()
        });
        let (grants, observer) = observe_grants(client.clone(), "t");
        until_held(&mut client, "every slice claimed, three per guest", |h| h.len() == 2 && h.values().all(|s| s.len() == 3)).await;

        let tail = Tail::follow(vec![enqueued_path(g2), records_path(g1), records_path(g2), r1.log_path(), r2.log_path()]);
        let runner_logs: BTreeMap<usize, String> = [(3, "g1".to_owned()), (4, "g2".to_owned())].into();
        let count = 60;
        let writer = g2.spawn(&writer_script(g2, &queue_dir, count, Duration::from_millis(200))).expect("start the writer");
        until(LONG, "20 entries written", || enqueued(&tail.seen(), SLICES).len() >= 20).await;
        // g1 holding slices with an entry of them in flight. Its slices are looked up each
        // time: an emulated guest on a loaded machine can fence and claim again meanwhile.
        let deadline = Instant::now() + LONG;
        let old_epochs: BTreeSet<i64> = loop {
            let held: BTreeMap<u32, i64> = claims(&mut client, "t", "in").await.expect("claims").into_iter().filter(|(_, (n, _))| n == "g1").map(|(s, (_, e))| (s, e)).collect();
            let in_flight = baks_in(&queue_dir).iter().any(|b| enqueued(&tail.seen(), SLICES).get(b).is_some_and(|(_, s)| held.contains_key(s)));
            if in_flight {
                break held.into_values().collect();
            }
            assert!(Instant::now() < deadline, "timed out waiting for g1 to hold slices with an entry in flight");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };

        g1.pause().expect("pause g1");
        let paused_ns = now_ns();
        // The guest's uptime when it stopped: its last heartbeat (at most 0.1 s and a fork before).
        let uptime_at_pause = last_uptime(g1).expect("g1's heartbeat");
        until_held(&mut client, "g1's slices claimed by g2", |h| !h.contains_key("g1") && h.get("g2").is_some_and(|s| s.len() == SLICES as usize)).await;
        let taken_over_ns = now_ns();
        // Paused longer than the TTL in any case.
        let past_ttl = paused_ns + (GUEST_TTL + Duration::from_secs(2)).as_nanos();
        until(LONG, "the TTL and 2 s to pass", || now_ns() > past_ttl).await;
        g1.resume().expect("resume g1");
        let resumed_ns = now_ns();
        eprintln!("g1 paused {:.1} s; its slices were claimed by g2 {:.1} s after the pause", (resumed_ns - paused_ns) as f64 / 1e9, (taken_over_ns - paused_ns) as f64 / 1e9);

        let rc = writer.wait(LONG).expect("the writer ends");
        assert_eq!(rc, 0, "the writer failed: {}", writer.output());
        until(LONG, "every entry processed", || every_entry_processed(&tail, &spool)).await;
        // g1 is back in the cluster: its runner fenced itself and joined again.
        until_held(&mut client, "g1 holding slices again", |h| h.contains_key("g1")).await;
        observer.abort();
        let uptime_after = last_uptime(g1).expect("g1's heartbeat");
        eprintln!(
            "g1's clock at the last heartbeat before the pause: {uptime_at_pause:.2} s since boot; now {uptime_after:.2} s (the host's wall clock moved {:.1} s since the pause)",
            (now_ns() - paused_ns) as f64 / 1e9
        );

        let seen = tail.seen();
        let enq = enqueued(&seen, SLICES);
        let guest_recs = records(&seen);
        // A start by g1 under a pre-pause epoch, from a handler forked after the pause.
        let dispatched_before_pause = |forked_ticks: u64| (forked_ticks as f64) / 100.0 <= uptime_at_pause + 0.3;
        let stale: Vec<_> = guest_recs
            .iter()
            .filter(|r| r.rec.what == "start" && r.rec.node == "g1" && old_epochs.contains(&r.rec.epoch) && r.rec.at_ns > paused_ns && !dispatched_before_pause(r.forked_ticks))
            .collect();
        assert!(stale.is_empty(), "g1 started entries under its old claims after the pause: {stale:?}");
        // The starts g1 dispatched before the pause, seen only after it resumed, happened
        // before the pause.
        let recs: Vec<_> = guest_recs
            .into_iter()
            .map(|mut r| {
                if r.rec.node == "g1" && r.rec.at_ns > paused_ns && dispatched_before_pause(r.forked_ticks) {
                    r.rec.at_ns = paused_ns;
                }
                r.rec
            })
            .collect();
        // The pause, and every fence a runner logged (g1's after the resume; any other on a
        // loaded machine): what a fenced node had in flight may run again elsewhere.
        let mut disruptions = vec![Disruption { node: "g1".into(), at_ns: paused_ns, what: "paused past the TTL".into() }];
        disruptions.extend(fences(&seen, &runner_logs));
        eprintln!("NFS pause: disruptions {:?}", disruptions.iter().map(|d| (&d.node, &d.what, d.at_ns)).collect::<Vec<_>>());
        let preserved = preserved_in(&spool);
        let report = check(&enq, &recs, &preserved, &grants.lock().expect("grants"), &disruptions);
        eprintln!("NFS pause: {}", report.summary());
        assert_eq!(report.preserved, 0, "nothing preserved or quarantined (a handler stopped at a fence counts no recovery): {preserved:?}");
        assert_eq!(enq.len(), count, "the writer logged every entry");
        assert!(report.ok(), "invariants broken: {}\nlost {:?}\nstale {:?}\nunexplained {:?}", report.summary(), report.lost, report.stale_starts, report.unexplained_duplicates);
        drop(logs);
        drop(tc);
    });
    drop(bed);
}

/// The last uptime a guest's heartbeat wrote.
fn last_uptime(guest: &qslice_testbeds::nfs::Guest) -> Option<f64> {
    let text = std::fs::read_to_string(guest.work().join("hb")).ok()?;
    text.lines().rev().find_map(|l| l.trim().parse().ok())
}

#[test]
fn mailman_in_two_guests_on_nfs_accepts_every_post_once_through_a_drain_and_a_kill() {
    mailman_on_nfs(RECOMMENDED);
}

/// qslice's Mailman 3 slice runner in two guests serving `in` of a whole site (PostgreSQL
/// on the host side, the site's var/ on NFS, each node's logs and pid files its own),
/// posts written through NFS by a poster in a guest (the queue files Mailman writes for a
/// message given as text, written without initialising Mailman, which takes an emulated
/// guest most of a minute), a drain and an uncordon of one node, then kill -9 of the
/// other's runner: every post accepted, once but for what the killed node had in flight,
/// nothing shunted or in bad/.
fn mailman_on_nfs(mount: &str) {
    let image = GuestImage::for_this_target().expect("the guest image");
    qslice_tests::mailman3::python().expect("the Mailman venv");
    enter_private_network().expect("a network namespace of the test's own");
    let export = tempfile::Builder::new().prefix("qslice-nfs-site-").tempdir().expect("the export");
    let site_dir = export.path().join("site");
    let options = SiteOptions { nodes: vec!["g1".into(), "g2".into()], dir: Some(site_dir.clone()), gateway: Some(GATEWAY.into()), ..SiteOptions::default() };
    let site = WholeSite::new(&options).expect("a whole Mailman site in the export");
    let mut bed_options = BedOptions::new(2, mount);
    bed_options.memory_mb = 512;
    bed_options.export = Some(export.path().to_owned());
    let bed = NfsBed::start(&image, &bed_options).expect("the NFS bed");
    runtime().block_on(async {
        let tc = TestCluster::builder()
            .spool(site.spool.clone())
            .queue("in", 2)
            .coordinators(1)
            // An emulated guest claims in seconds, not the default half-second: a slice
            // bounced between guests at the start hands off to cold Mailman processes.
            .coordinator_args(&["--revoke-deadline", "60s", "--claim-deadline", "5s"])
            .ready(Ready::Registered)
            .start()
            .await
            .expect("etcd and a coordinator");
        let mut client = tc.client();
        let port = tc.etcd().client_port();
        let queues = site_dir.join("var/queue");
        let start_runner = |g: &qslice_testbeds::nfs::Guest| {
            let cfg = site.runner_config(g.name(), &[("in", "")], "").expect("a runner config");
            g.spawn(&runner_script(g, "t", port, &queues, "", &format!("--config {cfg}"))).expect("start a runner")
        };
        let (g1, g2) = (bed.guest("g1"), bed.guest("g2"));
        let r1 = start_runner(g1);
        let r2 = start_runner(g2);
        let logs = LogsOnPanic(|| {
            [("g1", r1.output()), ("g2", r2.output()), ("coordinator", tc.coordinator("c1").proc.log())].iter().map(|(h, t)| last_lines(h, t, 80)).collect::<String>()
        });
        until_held(&mut client, "a slice of in claimed by each guest", |h| h.len() == 2 && h.values().all(|s| s.len() == 1)).await;

        let posts = 40;
        let poster = g2
            .spawn(&format!(
                "exec {} {} post-plain {} {posts} --start 0 --rate 2 --list test\n",
                site.python.display(),
                Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/mailman3_whole_site.py").display(),
                site_dir.display(),
            ))
            .expect("start the poster");
        let accepted = |n: usize| accepts(&site_dir).len() >= n;
        until(LONG, "posts accepted", || accepted(5)).await;

        // A drain of g1 (its slice runner finishes the message in hand) and its uncordon.
        let admin = &tc.coordinator("c1").admin;
        qslicectl(admin, "120s", &["drain", "g1"]);
        assert!(!holders(&mut client).await.contains_key("g1"), "g1 drained");
        qslicectl(admin, "120s", &["uncordon", "g1"]);
        until_held(&mut client, "g1 serving again", |h| h.contains_key("g1")).await;
        until(LONG, "more posts accepted", || accepted(15)).await;

        // kill -9 of g2's runner (its Mailman slice runner dies at its own deadline).
        let held = holders(&mut client).await;
        let orphaned = held.get("g2").map(Vec::len).unwrap_or(0);
        let killed_at = now_ns() as f64 / 1e9;
        r2.signal("KILL").expect("kill g2's runner");
        until(LONG, "g2's runner killed", || r2.signal_sent()).await;
        until_held(&mut client, "g2's slice taken over", |h| !h.contains_key("g2") && h.values().map(Vec::len).sum::<usize>() == 2).await;
        let taken_over_at = now_ns() as f64 / 1e9;

        let rc = poster.wait(LONG).expect("the poster ends");
        assert_eq!(rc, 0, "the poster failed: {}", poster.output());
        until(LONG, "every post accepted with in/ empty", || accepted(posts) && baks_in(&queues.join("in")).is_empty() && file_bases_in(&queues.join("in")).is_empty()).await;
        let all = accepts(&site_dir);
        let doubled: BTreeMap<&String, &Vec<(String, f64)>> = all.iter().filter(|(_, a)| a.len() > 1).collect();
        eprintln!("Mailman on NFS ({mount}): {} posts accepted, {} twice: {doubled:?}", all.len(), doubled.len());
        assert_eq!(all.len(), posts, "every post accepted");
        // A post in hand at a kill is accepted again by the next owner (Mailman's crash
        // window): by g2 at its kill, before its slice was taken over (guest clocks are
        // the RTC's, within a second of the host's), or by a node whose runner fenced (an
        // emulated guest on a loaded machine can miss its keepalives), one per slice.
        let fence_lines = |log: String| log.lines().filter(|l| l.contains("fenced: stopped all work") || l.contains("the fence deadline passed without a renewal")).count();
        let fences: BTreeMap<&str, usize> = [("g1", fence_lines(r1.output())), ("g2", fence_lines(r2.output()))].into_iter().collect();
        let allowed = orphaned + fences.values().sum::<usize>();
        assert!(doubled.len() <= allowed, "more doubles than slices g2 held at its kill and fences ({fences:?}): {doubled:?}");
        for (id, a) in &doubled {
            let at_the_kill = a[0].0 == "g2" && a[0].1 > killed_at - 1.0 && a[0].1 <= taken_over_at + 1.0;
            let at_a_fence = fences.get(a[0].0.as_str()).is_some_and(|n| *n > 0);
            assert!(
                a.len() == 2 && (at_the_kill || at_a_fence),
                "{id} accepted {} times, first by {:?}; killed at {killed_at:.3}, taken over at {taken_over_at:.3}, fences {fences:?}",
                a.len(),
                a[0]
            );
        }
        assert!(file_bases_in(&queues.join("shunt")).is_empty(), "nothing shunted");
        assert!(file_bases_in(&queues.join("bad")).is_empty(), "nothing in bad/");
        drop(logs);
        drop(r2);
        drop(tc);
    });
    drop(bed);
    drop(site);
}

/// Every ACCEPT line of every node's vette log: Message-ID -> [(node, Unix time)] in time order.
fn accepts(site_dir: &Path) -> BTreeMap<String, Vec<(String, f64)>> {
    let mut out: BTreeMap<String, Vec<(String, f64)>> = BTreeMap::new();
    let var = site_dir.join("var");
    for entry in std::fs::read_dir(&var).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(node) = name.strip_prefix("logs-") else { continue };
        let text = std::fs::read_to_string(entry.path().join("vette.log")).unwrap_or_default();
        for line in text.lines() {
            // `1715250000.123456 (4242) ACCEPT: <site-test-7@example.com>`
            let mut words = line.split_whitespace();
            let (Some(time), Some(_pid), Some("ACCEPT:"), Some(id)) = (words.next(), words.next(), words.next(), words.next()) else { continue };
            let Ok(time) = time.parse::<f64>() else { continue };
            out.entry(id.to_owned()).or_default().push((node.to_owned(), time));
        }
    }
    for a in out.values_mut() {
        a.sort_by(|x, y| x.1.total_cmp(&y.1));
    }
    out
}

/// What one client sees of another's renames, and so what qslice's takes, listings and
/// stranded-entry check can trust, with Linux's default NFSv4.1 options and with the
/// recommended ones (tests/fixtures/nfs_probe.py; the figures are docs/OPERATIONS.md's).
#[test]
fn what_an_nfs_client_sees_of_another_clients_renames_with_default_and_recommended_options() {
    let image = GuestImage::for_this_target().expect("the guest image");
    enter_private_network().expect("a network namespace of the test's own");
    let mut seen = Vec::new();
    for mount in [DEFAULTS, RECOMMENDED] {
        let bed = NfsBed::start(&image, &BedOptions::new(2, mount)).expect("the NFS bed");
        let (a, b) = (bed.guest("g1"), bed.guest("g2"));
        let probe = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/nfs_probe.py");
        let dir = bed.export();
        let step = |guest: &qslice_testbeds::nfs::Guest, args: &str| -> serde_json::Value {
            let (rc, out) = guest.run(&format!("exec python3 {} {args}\n", probe.display()), LONG).expect("a probe step");
            assert_eq!(rc, 0, "nfs_probe.py {args} in {}: {out}", guest.name());
            serde_json::from_str(out.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("nfs_probe.py {args} printed {out}: {e}"))
        };
        step(a, &format!("create {}", dir.display()));
        step(b, &format!("prime {}", dir.display()));
        let renamed = step(a, &format!("rename {}", dir.display()));
        let observed = step(b, &format!("observe {} 40", dir.display()));
        let renamed_at = renamed["renamed_at"].as_f64().expect("renamed_at");
        let observed_at = observed["observed_at"].as_f64().expect("observed_at");
        // How long after the rename a stat of the old name still worked, and after the
        // first look (the steps' round trips put seconds between the two).
        let stale_window = observed["stale_until"].as_f64().map(|t| (t - renamed_at, t - observed_at));
        eprintln!("NFS client caches ({mount}): {observed}; a stat of the renamed name first failed (after the rename, after the first look) {stale_window:?} s");
        // What qslice relies on, whatever the options: a take of a name another client
        // took fails (the server decides a rename), and a listing is fresh.
        assert_eq!(observed["take"], "ENOENT", "{mount}: a take of a name another client renamed must fail: {observed}");
        assert_eq!(observed["listed"], true, "{mount}: a listing right after another client's rename shows it: {observed}");
        seen.push((mount, observed, stale_window));
        drop(bed);
    }
    // With the recommended options nothing is stale: a lookup asks the server.
    let (_, recommended, window) = &seen[1];
    assert_eq!(recommended["stat_before_listing"], "ENOENT", "{RECOMMENDED}: a stat of a renamed name fails at once: {recommended}");
    assert!(window.is_some_and(|(_, after_look)| after_look < 0.5), "{RECOMMENDED}: the old name fails at the first look: {window:?}");
}
