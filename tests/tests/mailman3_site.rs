//! A whole Mailman 3.3.10 site (from PyPI) under qslice: PostgreSQL, mail delivered over
//! SMTP to a recording server of the test's own, two lists (one with a digest member),
//! several queues served by qslice-runners through qslice's slice runner, and a real
//! coordinator. Each test counts what reaches the recipients, not only log lines. These
//! tests need PyPI and Debian's PostgreSQL (tests/run.sh installs both) and never skip.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use qslice_tests::freezer::Freezer;
use qslice_tests::mailman3::Site;
use qslice_tests::site::{SiteOptions, SiteReport, WholeSite, POST_QUEUES, SITE_COORDINATOR_ARGS as SITE_REVOKE_DEADLINE, SITE_LEASE_TTL as SITE_TTL};
use qslice_tests::testcluster::{Ready, TestCluster};
use qslice_tests::{qslicectl, wait_for_async};

/// Generous bound for anything a loaded two-core machine does in seconds normally.
const LONG: Duration = Duration::from_secs(180);

/// The regular members of the test list, and of the digest list (d5 takes MIME digests).
const TEST_MEMBERS: [&str; 5] = ["m1@example.com", "m2@example.com", "m3@example.com", "m4@example.com", "m5@example.com"];
const DIGEST_REGULAR: [&str; 4] = ["d1@example.com", "d2@example.com", "d3@example.com", "d4@example.com"];
const DIGEST_MEMBER: &str = "d5@example.com";

struct Cluster {
    // Field order is drop order: the runners stop before the site's servers.
    tc: TestCluster,
    site: WholeSite,
    /// The queues qslice serves here (the others fill up unserved).
    served: Vec<String>,
}

/// A site, a coordinator and one qslice-runner per node serving `queues` (name, slices)
/// with qslice's slice runner; `env` per node (e.g. QSLICE_HOST). Returns once every
/// slice is claimed.
async fn cluster(options: SiteOptions, queues: &[(&str, u32)], extra: &str, env: &[(&str, &[(&str, &str)])]) -> Cluster {
    let site = WholeSite::new(&options).expect("a whole Mailman 3 site");
    let mut builder = TestCluster::builder().spool(site.spool.clone()).queues(queues).coordinators(1).coordinator_args(SITE_REVOKE_DEADLINE);
    let supervised: Vec<(&str, &str)> = queues.iter().map(|(q, _)| (*q, extra)).collect();
    for node in &options.nodes {
        let cfg = site.runner_config(node, &supervised, "").expect("runner config");
        let mut node_env = vec![SITE_TTL];
        node_env.extend_from_slice(env.iter().find(|(n, _)| n == node).map(|(_, e)| *e).unwrap_or(&[]));
        builder = builder.runner_with(node, &["--config", &cfg], &node_env);
    }
    let tc = builder.ready(Ready::Claimed).ready_timeout(LONG).start().await.expect("cluster");
    Cluster { tc, site, served: queues.iter().map(|(q, _)| q.to_string()).collect() }
}

impl Cluster {
    fn logs(&self) -> String {
        self.tc.runners().iter().map(|(n, p)| format!("--- {n}\n{}\n", tail_lines(&p.log(), 60))).collect()
    }

    /// Waits until posting is done and `done` holds of the site's report with every queue
    /// empty; returns that report.
    async fn settled(&mut self, what: &str, done: impl Fn(&SiteReport, &WholeSite) -> bool) -> SiteReport {
        let site = &mut self.site;
        wait_for_async(LONG, "posting done", || {
            let finished = site.posting_done();
            async move { finished }
        })
        .await
        .expect("posted");
        let mut last = None;
        let site = &self.site;
        let served = &self.served;
        let settled = wait_for_async(LONG, what, || {
            let report = site.report().ok();
            let ok = report.as_ref().is_some_and(|r| served.iter().all(|q| r.queues.get(q).is_none_or(|c| c.pck == 0 && c.bak == 0)) && done(r, site));
            last = report;
            async move { ok }
        })
        .await;
        if let Err(e) = settled {
            panic!("{e}: {last:#?}\n{}", self.logs());
        }
        last.expect("a report")
    }
}

impl Cluster {
    /// Sends every list's pending digest and waits until the digest member's digests hold
    /// each of the digest list's first `n` posts; returns the report then.
    async fn last_digests_sent(&mut self, n: usize) -> SiteReport {
        self.site.send_digests().expect("send digests");
        self.settled("the last digest sent", |_, site| {
            let ids: BTreeSet<String> = site.sink.deliveries().into_iter().filter(|d| d.rcpt == DIGEST_MEMBER).flat_map(|d| d.digest_ids).collect();
            post_ids("digest", 0..n).iter().all(|id| ids.contains(id))
        })
        .await
    }
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn post_ids(list: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|n| format!("<site-{list}-{n}@example.com>")).collect()
}

/// Every post of `ids` delivered exactly once to each of `members`; the first problem.
fn each_delivered_once(counts: &BTreeMap<(String, String), usize>, ids: &[String], members: &[&str]) -> Result<(), String> {
    for id in ids {
        for member in members {
            match counts.get(&(member.to_string(), id.clone())).copied().unwrap_or(0) {
                1 => {}
                n => return Err(format!("{id} reached {member} {n} times")),
            }
        }
    }
    Ok(())
}

/// Nothing shunted, nothing in bad/, nothing in Mailman's error logs.
fn assert_clean(report: &SiteReport) {
    assert_eq!(report.shunt, 0, "shunted: {:?}", report.errors);
    assert_eq!(report.bad, 0, "in bad/: {:?}", report.errors);
    assert!(report.errors.is_empty(), "Mailman's error logs: {:#?}", report.errors);
    assert!(report.archiver_errors.is_empty(), "the archiver discarded posts: {:#?}", report.archiver_errors);
}

#[tokio::test]
async fn retry_keeps_its_sleep_time_through_an_smtp_outage_and_every_post_goes_out_once() {
    // A retry sleep twice the runners' lease (TTL 5 s, renewed every 1.7 s): a slice
    // runner that cut its sleeps at the lease left would try each post every 3-4 s.
    let sleep = 10.0;
    let options = SiteOptions { retry_sleep: format!("{sleep}s"), ..SiteOptions::default() };
    let queues = [("in", 1), ("pipeline", 1), ("out", 2), ("retry", 1), ("virgin", 1)];
    let mut c = cluster(options, &queues, "", &[]).await;
    c.site.sink.set_failing(true).expect("451 on");
    c.site.post("test", 10, 0).expect("post");
    let sink = &c.site.sink;
    wait_for_async(LONG, "every post refused once", || {
        let refused: BTreeSet<String> = sink.refusals().into_iter().filter_map(|r| r.message_id).collect();
        async move { refused.len() >= 10 }
    })
    .await
    .expect("refused");
    let outage = Duration::from_secs(30);
    tokio::time::sleep(outage).await; // the outage itself: the SMTP server answers 451 for this long
    c.site.sink.set_failing(false).expect("451 off");
    let ids = post_ids("test", 0..10);
    let report = c.settled("every post delivered after the outage", |_, site| each_delivered_once(&site.delivery_counts(), &ids, &TEST_MEMBERS).is_ok()).await;
    assert_clean(&report);
    // Tries per post: attempts (one SMTP transaction each, refused for all recipients)
    // told apart by time.
    let mut tries: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in c.site.sink.refusals() {
        let Some(id) = r.message_id else { continue };
        let times = tries.entry(id).or_default();
        if times.iter().all(|t| (t - r.t).abs() > 0.5) {
            times.push(r.t);
        }
    }
    // The first try, then at most one per retry pass, passes being `sleep` apart: over the
    // outage (plus the wait for the first refusals) at most ceil(outage / sleep) + 1 more.
    let bound = 2 + (outage.as_secs_f64() / sleep).ceil() as usize;
    let most = tries.values().map(Vec::len).max().unwrap_or(0);
    println!("SMTP outage of {outage:?} with retry sleep_time {sleep} s: tries per post {:?} (bound {bound})", tries.values().map(Vec::len).collect::<Vec<_>>());
    assert!(most >= 2, "the outage made posts wait for retry: {tries:?}");
    assert!(most <= bound, "a post was tried {most} times in a {outage:?} outage with sleep_time {sleep} s: {tries:?}");
}

#[tokio::test]
async fn bounces_at_two_slices_process_each_bounce_event_once() {
    let queues = [("bounces", 2), ("virgin", 1)];
    let mut c = cluster(SiteOptions::default(), &queues, "", &[]).await;
    c.site.bounce(40, 0).expect("bounces");
    let report = c.settled("every bounce event processed", |r, _| r.bounce_events.total == 40 && r.bounce_events.processed == 40).await;
    // One line per processing of an event, whatever its outcome.
    let processings: Vec<&String> = report
        .bounce_log
        .iter()
        .filter(|l| ["bounce score =", "already scored a bounce", "Residual bounce received", "Probe bounce received"].iter().any(|p| l.contains(p)))
        .collect();
    println!("40 bounce events at 2 slices: {} processings", processings.len());
    assert_eq!(processings.len(), 40, "each bounce event processed once: {processings:#?}");
    assert_clean(&report);
}

/// Posts to both lists through pipeline, out, digest and archive at two slices each.
const FLOW_QUEUES: [(&str, u32); 6] = [("in", 2), ("pipeline", 2), ("out", 2), ("digest", 2), ("archive", 2), ("virgin", 1)];

/// Checks a settled flow of `n` posts to each list: each post out once to every regular
/// member, in the digest member's digests once, in the archive once, and post_id
/// advanced by exactly `n` per list.
fn assert_flow(report: &SiteReport, site: &WholeSite, n: usize) {
    assert_clean(report);
    let counts = site.delivery_counts();
    let test_ids = post_ids("test", 0..n);
    let digest_ids = post_ids("digest", 0..n);
    each_delivered_once(&counts, &test_ids, &TEST_MEMBERS).expect("test list");
    each_delivered_once(&counts, &digest_ids, &DIGEST_REGULAR).expect("digest list");
    let mut in_digests: BTreeMap<String, usize> = BTreeMap::new();
    for d in site.sink.deliveries().into_iter().filter(|d| d.rcpt == DIGEST_MEMBER) {
        for id in d.digest_ids {
            *in_digests.entry(id).or_insert(0) += 1;
        }
    }
    for id in &digest_ids {
        assert_eq!(in_digests.get(id).copied().unwrap_or(0), 1, "{id} in the digests: {in_digests:?}");
    }
    assert_eq!(report.post_id.get("test.example.com").copied(), Some(1 + n as i64), "post_id of the test list (starts at 1): {:?}", report.post_id);
    assert_eq!(report.post_id.get("digest.example.com").copied(), Some(1 + n as i64), "post_id of the digest list: {:?}", report.post_id);
    for (list, ids) in [("test@example.com", &test_ids), ("digest@example.com", &digest_ids)] {
        let archived: BTreeSet<&String> = report.archive_ids.get(list).map(|v| v.iter().collect()).unwrap_or_default();
        assert_eq!(report.archive.get(list).copied(), Some(n), "{list}'s archive holds each post once");
        assert!(ids.iter().all(|id| archived.contains(id)), "{list}'s archive misses posts");
    }
}

#[tokio::test]
async fn pipeline_digest_and_archive_at_two_slices_shunt_discard_and_lose_nothing() {
    let mut c = cluster(SiteOptions::default(), &FLOW_QUEUES, "", &[]).await;
    let n = 120;
    c.site.post_in_background("test", n, 0, 30.0).expect("post");
    c.site.post_in_background("digest", n, 0, 30.0).expect("post");
    let site_flowed = |r: &SiteReport, site: &WholeSite| {
        let counts = site.delivery_counts();
        r.post_id.values().all(|p| *p > n as i64) && each_delivered_once(&counts, &post_ids("test", 0..n), &TEST_MEMBERS).is_ok()
    };
    c.settled("every post through the pipeline and out", site_flowed).await;
    let report = c.last_digests_sent(n).await;
    assert_flow(&report, &c.site, n);
}

#[tokio::test]
async fn a_dead_host_leaves_no_mailman_lock_that_shunts_or_discards_later_mail() {
    let mut c = cluster(SiteOptions::default(), &FLOW_QUEUES, "", &[]).await;
    let n = 80;
    c.site.post_in_background("test", n, 0, 15.0).expect("post");
    c.site.post_in_background("digest", n, 0, 15.0).expect("post");
    going_out(&c, 60).await;
    // r1's host dies while its slice runners hold messages of every stage: qslice-runner,
    // its leash and its Mailman processes stop at one instant (the cgroup freezer), what
    // they hold in flight is read from the spool, and then all of them are SIGKILLed. The
    // Mailman locks a process killed inside to-digest, the digest runner or the archiver
    // leaves are left too.
    let freezer = Freezer::new().expect("freezer");
    freezer.add_tree(c.tc.runner("r1").pid().expect("r1's pid")).expect("r1's processes");
    freezer.freeze().expect("freeze");
    let in_flight: BTreeSet<String> = c.site.in_flight().expect("in flight").into_iter().collect();
    for pid in freezer.pids() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
    }
    freezer.thaw().expect("thaw, so that the killed processes go");
    let planted = c.site.plant_dead_locks().expect("locks");
    let flowed = |r: &SiteReport, site: &WholeSite| {
        let counts = site.delivery_counts();
        r.post_id.values().all(|p| *p > n as i64) && post_ids("test", 0..n).iter().all(|id| TEST_MEMBERS.iter().all(|m| counts.contains_key(&(m.to_string(), id.clone()))))
    };
    c.settled("every post out after the kill", flowed).await;
    let report = c.last_digests_sent(n).await;
    assert_clean(&report);
    for lock in &planted {
        assert!(!lock.exists(), "{} was broken by the list's next holder", lock.display());
    }
    let logs: String = c.tc.runners().values().map(|r| r.log()).collect();
    assert!(logs.contains("broke a mailbox dot lock left by a process that died"), "the broken lock is logged:\n{}", c.logs());
    // Each post reached each member; a second copy only of a post in flight at the kill.
    let counts = c.site.delivery_counts();
    for (list, members) in [("test", &TEST_MEMBERS[..]), ("digest", &DIGEST_REGULAR[..])] {
        for id in post_ids(list, 0..n) {
            for m in members {
                let times = counts.get(&(m.to_string(), id.clone())).copied().unwrap_or(0);
                assert!(times == 1 || (times == 2 && in_flight.contains(&id)), "{id} reached {m} {times} times (in flight at the kill: {in_flight:?})");
            }
        }
    }
    for (list, archived) in &report.archive_ids {
        let prefix = if list.starts_with("test") { "test" } else { "digest" };
        for id in post_ids(prefix, 0..n) {
            assert!(archived.contains(&id), "{id} missing from {list}'s archive");
        }
    }
    println!("death of r1's host with {} entries in flight; broke {} planted locks; every post delivered and archived", in_flight.len(), planted.len());
}

/// Waits until some runner's log holds a queue refusal; returns that log.
async fn refusal(tc: &TestCluster) -> String {
    let mut found = String::new();
    wait_for_async(LONG, "a node refusing the queue", || {
        found = tc.runners().values().map(|r| r.log()).find(|l| l.contains("alert: giving this queue up")).unwrap_or_default();
        let refused = !found.is_empty();
        async move { refused }
    })
    .await
    .expect("refused");
    found
}

#[tokio::test]
async fn a_sqlite_site_served_from_two_hosts_is_refused_naming_the_database() {
    let site = Site::new().expect("a SQLite site");
    let mut builder = TestCluster::builder().spool(site.spool.clone()).queue("in", 2).coordinators(1);
    for (node, host) in [("r1", "host-a"), ("r2", "host-b")] {
        let cfg = site.runner_config(&format!("{node}.toml"), "env = [\"QSLICE_HOST\"]\n").expect("config");
        builder = builder.runner_with(node, &["--config", &cfg], &[("QSLICE_HOST", host)]);
    }
    let tc = builder.ready(Ready::Registered).ready_timeout(LONG).start().await.expect("cluster");
    site.post(5, 0).expect("post");
    let log = refusal(&tc).await;
    assert!(log.contains("[database] url is SQLite"), "the refusal names the database: {log}");
    assert!(log.contains("PostgreSQL"), "and says what to do: {log}");
}

#[tokio::test]
async fn a_directory_that_is_not_shared_between_hosts_is_refused_naming_its_key() {
    let options = SiteOptions::default();
    let site = WholeSite::new(&options).expect("site");
    // r2's host has a template_dir of its own: a per-host copy of a shared directory.
    let own = site.spool.scratch("templates-r2");
    let cfg = std::fs::read_to_string(site.config("r2")).expect("read");
    let lock_line = cfg.lines().find(|l| l.starts_with("lock_file:")).expect("lock_file line").to_owned();
    std::fs::write(site.config("r2"), cfg.replace(&lock_line, &format!("{lock_line}\ntemplate_dir: {}", own.display()))).expect("write");
    let mut builder = TestCluster::builder().spool(site.spool.clone()).queue("in", 2).coordinators(1);
    for (node, host) in [("r1", "host-a"), ("r2", "host-b")] {
        let cfg = site.runner_config(node, &[("in", "")], "").expect("config");
        builder = builder.runner_with(node, &["--config", &cfg], &[("QSLICE_HOST", host)]);
    }
    let tc = builder.ready(Ready::Registered).ready_timeout(LONG).start().await.expect("cluster");
    site.post("test", 5, 0).expect("post");
    let log = refusal(&tc).await;
    assert!(log.contains("[paths] template_dir"), "the refusal names the key: {log}");
    assert!(log.contains("Every node must mount the same template_dir"), "and says what to do: {log}");
}

#[tokio::test]
async fn a_correctly_shared_site_on_two_hosts_is_served_by_both() {
    let env_r1: &[(&str, &str)] = &[("QSLICE_HOST", "host-a")];
    let env_r2: &[(&str, &str)] = &[("QSLICE_HOST", "host-b")];
    let queues = [("in", 2), ("pipeline", 2), ("out", 2), ("virgin", 1)];
    let mut c = cluster(SiteOptions::default(), &queues, "", &[("r1", env_r1), ("r2", env_r2)]).await;
    c.site.post("test", 20, 0).expect("post");
    let ids = post_ids("test", 0..20);
    let report = c.settled("every post delivered", |_, site| each_delivered_once(&site.delivery_counts(), &ids, &TEST_MEMBERS).is_ok()).await;
    assert_clean(&report);
    for (node, runner) in c.tc.runners() {
        assert!(!runner.log().contains("giving this queue up"), "{node} refused a queue:\n{}", c.logs());
    }
    let markers: BTreeSet<String> =
        std::fs::read_dir(c.site.dir.join("var/queue/.qslice/site")).expect("markers").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(markers, BTreeSet::from(["r1".to_owned(), "r2".to_owned()]), "both nodes checked the site");
}

/// Every queue runner of a site, as the site example serves them (docs/SUPERVISING.md),
/// but nntp: its periodic `mailman gatenews` refuses to run as root, which tests are.
const SITE_QUEUES: [(&str, u32); 9] = [("in", 2), ("pipeline", 2), ("out", 2), ("retry", 1), ("bounces", 2), ("digest", 2), ("archive", 2), ("virgin", 1), ("command", 1)];

#[tokio::test]
async fn a_cold_start_of_a_whole_site_under_load_claims_and_serves_every_slice_without_a_storm() {
    let options = SiteOptions::default();
    let mut site = WholeSite::new(&options).expect("site");
    // A backlog waits at the first start, and posts keep coming while it starts.
    site.post("test", 40, 0).expect("post");
    site.post("digest", 40, 0).expect("post");
    let runner_script = site.python.parent().expect("venv bin").join("runner");
    let mut builder = TestCluster::builder().spool(site.spool.clone()).queues(&SITE_QUEUES).coordinators(1).coordinator_args(SITE_REVOKE_DEADLINE);
    for node in &options.nodes {
        // Mailman's task runner (no queue) as a long-running singleton of the cluster.
        let task = format!(
            "[singleton.task]\ncommand = [{:?}, \"-C\", {:?}, \"-r\", \"task\"]\nlong_running = true\n",
            runner_script.display().to_string(),
            site.config(node).display().to_string()
        );
        let supervised: Vec<(&str, &str)> = SITE_QUEUES.iter().map(|(q, _)| (*q, "spares = 1\n")).collect();
        let cfg = site.runner_config(node, &supervised, &task).expect("config");
        builder = builder.runner_with(node, &["--config", &cfg], &[SITE_TTL]);
    }
    let started = std::time::Instant::now();
    let tc = builder.ready(Ready::Registered).ready_timeout(LONG).start().await.expect("cluster");
    site.post_in_background("test", 40, 40, 10.0).expect("post");
    site.post_in_background("digest", 40, 40, 10.0).expect("post");
    // Every slice served: a slice runner running it on some node.
    let wanted: BTreeSet<(String, u32)> = SITE_QUEUES.iter().flat_map(|(q, n)| (0..*n).map(move |s| (q.to_string(), s))).collect();
    let mut serving = BTreeSet::new();
    wait_for_async(LONG, "every slice served by a running slice runner", || {
        for runner in tc.runners().values() {
            for line in runner.log().lines().filter(|l| l.contains("Mailman slice runner is running the slice")) {
                let field = |name: &str| line.split(&format!(" {name}=")).nth(1).and_then(|r| r.split_whitespace().next()).map(str::to_owned);
                if let (Some(queue), Some(slice)) = (field("queue"), field("slice").and_then(|s| s.parse::<u32>().ok())) {
                    serving.insert((queue, slice));
                }
            }
        }
        let all = wanted.is_subset(&serving);
        async move { all }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: serving {serving:?}"));
    let all_serving = started.elapsed();
    // One fork server per node initialised Mailman for the site's every queue (one
    // configuration), and forked each slice runner (a forked child keeps its command line).
    for (node, runner) in tc.runners() {
        let cfg = site.config(node).display().to_string();
        let runner_pid = runner.pid().expect("the runner runs");
        let forking = processes_with_args(&["--fork-server", &cfg]);
        let servers: Vec<u32> = forking.iter().copied().filter(|pid| parent_of(*pid) == Some(runner_pid)).collect();
        assert_eq!(servers.len(), 1, "one fork server on {node} for {} queues: {forking:?}", SITE_QUEUES.len());
        let forked = forking.iter().filter(|pid| parent_of(**pid) == Some(servers[0])).count();
        assert!(forked >= SITE_QUEUES.len(), "{node}'s slice runners of every queue forked from its one server: {forked} of {forking:?}");
    }
    let mut c = Cluster { tc, site, served: SITE_QUEUES.iter().map(|(q, _)| q.to_string()).collect() };
    let ids_test = post_ids("test", 0..80);
    let ids_digest = post_ids("digest", 0..80);
    let report = c
        .settled("every post delivered", |_, site| {
            let counts = site.delivery_counts();
            each_delivered_once(&counts, &ids_test, &TEST_MEMBERS).is_ok() && each_delivered_once(&counts, &ids_digest, &DIGEST_REGULAR).is_ok()
        })
        .await;
    let slices: u32 = SITE_QUEUES.iter().map(|(_, n)| n).sum();
    let delays = claim_delays(&c.tc.coordinator("c1").proc.log(), c.tc.runners().values().map(|r| r.log()).collect::<Vec<_>>().join("\n").as_str());
    println!(
        "cold start of a two-node site ({slices} slices of {} queues, 80 posts waiting, 20 posts/s arriving): every slice served {all_serving:.1?} after the start; assignment -> claim p50 {:.0} ms, max {:.0} ms over {} claims",
        SITE_QUEUES.len(),
        delays.get(delays.len() / 2).copied().unwrap_or(0.0) * 1000.0,
        delays.last().copied().unwrap_or(0.0) * 1000.0,
        delays.len()
    );
    assert_clean(&report);
    let coordinator = c.tc.coordinator("c1").proc.log();
    assert!(!coordinator.contains("did not claim"), "a claim-deadline reassignment at the cold start:\n{coordinator}");
    let logs: String = c.tc.runners().values().map(|r| r.log()).collect();
    if let Ok(dir) = std::env::var("QSLICE_TEST_KEEP_LOGS") {
        for (node, runner) in c.tc.runners() {
            let _ = std::fs::write(format!("{dir}/cold-{node}.log"), runner.log());
        }
        let _ = std::fs::write(format!("{dir}/cold-coordinator.log"), &coordinator);
    }
    for storm in
        ["did not finish its message within the stop timeout", "the lease already lapsed", "reached the fence deadline", "stopped at the fence deadline", "giving this queue up"]
    {
        assert!(!logs.contains(storm), "{storm:?} at the cold start:\n{}", c.logs());
    }
    // Mailman's task runner runs, on one node at a time: exactly one such process now.
    let site_dir = c.site.dir.display().to_string();
    let task_processes = wait_for_async(LONG, "one task runner process", || {
        let n = processes_with_args(&[&site_dir, "task"]).len();
        async move { n == 1 }
    })
    .await;
    let singleton_lines: String =
        c.tc.runners().iter().flat_map(|(n, r)| r.log().lines().filter(|l| l.contains("singleton")).map(|l| format!("{n}: {l}\n")).collect::<Vec<_>>()).collect();
    task_processes.unwrap_or_else(|e| panic!("{e}: {:?}\n{singleton_lines}", processes_with_args(&[&site_dir, "task"])));
    println!("{singleton_lines}");
}

/// Seconds since midnight of a log line's RFC 3339 UTC timestamp (`2026-12-07T00:13:16.346168Z ...`).
fn line_time(line: &str) -> Option<f64> {
    let time = line.split_whitespace().next()?.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':');
    let (h, m, s) = (parts.next()?.parse::<f64>().ok()?, parts.next()?.parse::<f64>().ok()?, parts.next()?.parse::<f64>().ok()?);
    Some(h * 3600.0 + m * 60.0 + s)
}

/// A `key=value` field of a log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(&format!(" {key}=")).nth(1)?.split_whitespace().next()
}

/// The delays from each slice's (last) assignment in the coordinator's log to its claim
/// in a runner's log, sorted: what the claim deadline has to allow for.
fn claim_delays(coordinator: &str, runners: &str) -> Vec<f64> {
    let mut assigned: BTreeMap<(String, String), f64> = BTreeMap::new();
    for line in coordinator.lines().filter(|l| l.contains("assigned slice")) {
        if let (Some(t), Some(q), Some(s)) = (line_time(line), field(line, "queue"), field(line, "slice")) {
            assigned.insert((q.to_owned(), s.to_owned()), t);
        }
    }
    let mut delays: Vec<f64> = runners
        .lines()
        .filter(|l| l.contains("claimed slice"))
        .filter_map(|l| Some((line_time(l)?, assigned.get(&(field(l, "queue")?.to_owned(), field(l, "slice")?.to_owned()))?)))
        .map(|(claimed, at)| claimed - at)
        .filter(|d| *d >= 0.0)
        .collect();
    delays.sort_by(f64::total_cmp);
    delays
}

/// The parent pid of process `pid`.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok()
}

/// Pids of the processes whose command line has every one of `args` among its arguments
/// (or as a prefix of one).
fn processes_with_args(args: &[&str]) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let argv: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            args.iter().all(|want| argv.iter().any(|a| a == want || a.starts_with(want)))
        })
        .collect()
}

/// The queues of the whole-site end-to-end runs: every queue runner a post passes through.
const E2E_QUEUES: [(&str, u32); 7] = POST_QUEUES;

/// What an end-to-end run does to the site while posts flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Nothing.
    None,
    /// kill -9 of r1's qslice-runner (its Mailman slice runners die at their deadline),
    /// restarted once its slices moved.
    KillRunner,
    /// A drain of r1 and its uncordon.
    DrainAndUncordon,
    /// `out` and `in` resliced from 2 to 4 slices and back, live.
    Reslice,
    /// r1's host dies: its qslice-runner, leash, Mailman slice runners and LMTP server
    /// stopped at one instant (the cgroup freezer) and SIGKILLed; the host comes back once
    /// its slices moved.
    HostDeath,
    /// r1's host (the same processes) frozen until r2 has claimed its slices, longer than
    /// the TTL, then thawed.
    HostFreeze,
    /// The SMTP server answers 451 to everything for 30 s; retry's sleep_time is 2 s.
    SmtpOutage,
}

/// The slices `node` holds of each of the end-to-end queues: queue -> (slice count, slices).
async fn held_by(tc: &TestCluster, node: &str) -> BTreeMap<String, (u32, Vec<u32>)> {
    let mut held = BTreeMap::new();
    for (q, slices) in E2E_QUEUES {
        held.insert(q.to_owned(), (slices, tc.holdings(q).await.remove(node).unwrap_or_default()));
    }
    held
}

/// Waits until `node` holds no slice of the end-to-end queues.
async fn taken_from(tc: &TestCluster, node: &str) {
    wait_for_async(LONG, &format!("{node}'s slices taken over"), || async move {
        let mut moved = true;
        for (q, _) in E2E_QUEUES {
            moved &= !tc.holdings(q).await.contains_key(node);
        }
        moved
    })
    .await
    .expect("taken over");
}

/// Freezes r1's host: its qslice-runner with every process under it, and its LMTP server.
fn freeze_host(c: &Cluster) -> Freezer {
    let freezer = Freezer::new().expect("freezer");
    freezer.add_tree(c.tc.runner("r1").pid().expect("r1's pid")).expect("r1's processes");
    freezer.add_tree(c.site.lmtp_pid("r1").expect("r1's LMTP server")).expect("r1's LMTP server");
    freezer.freeze().expect("freeze");
    freezer
}

/// Starts r1's qslice-runner again, as its host coming back does.
fn restart_r1(c: &mut Cluster) {
    let cfg = c.site.runner_config("r1", &E2E_QUEUES.iter().map(|(q, _)| (*q, "")).collect::<Vec<_>>(), "").expect("runner config");
    c.tc.start_runner_with("r1", &["--config", &cfg], &[SITE_TTL]).expect("restart r1");
}

/// Does `fault` to the site of `c`; returns the posts that may go out twice (those in
/// flight on r1 when it was killed or frozen).
async fn apply(fault: Fault, c: &mut Cluster) -> BTreeSet<String> {
    let mut may_double = BTreeSet::new();
    let queue_dir = c.site.dir.join("var/queue");
    match fault {
        Fault::None => {}
        Fault::KillRunner => {
            // What r1 has in flight from the kill until its slices are taken over: a post
            // its slice runners hold then may go out twice, and only such a post.
            let watch = BakWatch::start(&queue_dir, held_by(&c.tc, "r1").await);
            c.tc.runner_mut("r1").kill();
            taken_from(&c.tc, "r1").await;
            may_double = watch.stop();
            restart_r1(c);
        }
        Fault::HostDeath => {
            let held = held_by(&c.tc, "r1").await;
            let freezer = freeze_host(c);
            // Stopped, its processes hold what they hold: each may go out twice.
            may_double = baks_in(&queue_dir, &held);
            for pid in freezer.pids() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            }
            freezer.thaw().expect("thaw, so that the killed processes go");
            c.tc.runner_mut("r1").kill();
            c.site.kill_lmtp("r1");
            taken_from(&c.tc, "r1").await;
            restart_r1(c);
            c.site.start_lmtp("r1").expect("r1's LMTP server back");
        }
        Fault::HostFreeze => {
            let held = held_by(&c.tc, "r1").await;
            let freezer = freeze_host(c);
            may_double = baks_in(&queue_dir, &held);
            taken_from(&c.tc, "r1").await;
            freezer.thaw().expect("thaw");
            drop(freezer);
        }
        Fault::SmtpOutage => {
            c.site.sink.set_failing(true).expect("451 on");
            tokio::time::sleep(Duration::from_secs(30)).await; // the outage itself
            c.site.sink.set_failing(false).expect("451 off");
        }
        Fault::DrainAndUncordon => {
            let admin = c.tc.coordinator("c1").admin.clone();
            qslicectl(&admin, "120s", &["drain", "r1"]);
            for (q, _) in E2E_QUEUES {
                assert!(!c.tc.holdings(q).await.contains_key("r1"), "r1 drained of {q}");
            }
            qslicectl(&admin, "120s", &["uncordon", "r1"]);
        }
        Fault::Reslice => {
            let admin = c.tc.coordinator("c1").admin.clone();
            for slices in ["4", "2"] {
                for q in ["out", "in"] {
                    qslicectl(&admin, "120s", &["queue", "set", q, "--slices", slices, "--mailman3"]);
                }
                wait_for_async(LONG, "out and in claimed at the new count", || {
                    let (tc, want) = (&c.tc, slices.parse::<usize>().expect("count"));
                    async move { tc.holdings("out").await.values().map(Vec::len).sum::<usize>() == want && tc.holdings("in").await.values().map(Vec::len).sum::<usize>() == want }
                })
                .await
                .expect("resliced");
            }
        }
    }
    may_double
}

/// At the sink each regular member holds each post once, the digest member's digests
/// hold each post once, and the archive each post: a second copy only of a post in
/// `may_double`.
fn delivered_once_to_mailboxes_digests_and_archive(fault: Fault, c: &Cluster, report: &SiteReport, n: usize, may_double: &BTreeSet<String>) {
    let counts = c.site.delivery_counts();
    for (list, members) in [("test", &TEST_MEMBERS[..]), ("digest", &DIGEST_REGULAR[..])] {
        for id in post_ids(list, 0..n) {
            for m in members {
                let times = counts.get(&(m.to_string(), id.clone())).copied().unwrap_or(0);
                assert!(times == 1 || (times == 2 && may_double.contains(&id)), "{fault:?}: {id} reached {m} {times} times (may go out twice: {may_double:?})");
            }
        }
    }
    let mut in_digests: BTreeMap<String, usize> = BTreeMap::new();
    for d in c.site.sink.deliveries().into_iter().filter(|d| d.rcpt == DIGEST_MEMBER) {
        for id in d.digest_ids {
            *in_digests.entry(id).or_insert(0) += 1;
        }
    }
    for id in post_ids("digest", 0..n) {
        let times = in_digests.get(&id).copied().unwrap_or(0);
        assert!(times == 1 || (times == 2 && may_double.contains(&id)), "{fault:?}: {id} in the digests {times} times");
    }
    for (list, prefix) in [("test@example.com", "test"), ("digest@example.com", "digest")] {
        let archived: BTreeSet<&String> = report.archive_ids.get(list).map(|v| v.iter().collect()).unwrap_or_default();
        assert!(post_ids(prefix, 0..n).iter().all(|id| archived.contains(id)), "{fault:?}: {list}'s archive misses posts");
    }
}

/// Waits until the sink has had `deliveries` deliveries: posts are going out.
async fn going_out(c: &Cluster, deliveries: usize) {
    let sink = &c.site.sink;
    wait_for_async(LONG, "posts going out", || {
        let delivered = sink.deliveries().len();
        async move { delivered >= deliveries }
    })
    .await
    .expect("flowing");
}

/// A whole site end to end: posts to both lists arrive over LMTP at every node's `lmtp`
/// runner (Mailman's, outside qslice, as systemd runs it), flow through every queue
/// served by two qslice-runners, and go out over SMTP, while `fault` happens; at the sink
/// each regular member holds each post exactly once (a second copy only of a post in
/// flight on r1 when it was killed), the digest member's digests hold each post once, the
/// archive too, and Mailman's logs hold no error. Returns the latencies (LMTP accepted ->
/// last delivery, seconds, sorted).
async fn end_to_end(fault: Fault) -> Vec<f64> {
    let retry_sleep = if fault == Fault::SmtpOutage { "2s" } else { "3s" };
    let options = SiteOptions { lmtp: true, retry_sleep: retry_sleep.into(), ..SiteOptions::default() };
    let mut c = cluster(options, &E2E_QUEUES, "", &[]).await;
    for node in ["r1", "r2"] {
        c.site.start_lmtp(node).expect("the node's LMTP server");
    }
    let n = 40;
    c.site.post_lmtp_in_background("test", n, 0, 8.0).expect("post over LMTP");
    c.site.post_lmtp_in_background("digest", n, 0, 8.0).expect("post over LMTP");
    going_out(&c, 30).await;
    let mut may_double = apply(fault, &mut c).await;
    let flowed = |r: &SiteReport, site: &WholeSite| {
        let counts = site.delivery_counts();
        r.post_id.values().all(|p| *p > n as i64) && post_ids("test", 0..n).iter().all(|id| TEST_MEMBERS.iter().all(|m| counts.contains_key(&(m.to_string(), id.clone()))))
    };
    c.settled("every post accepted over LMTP and out", flowed).await;
    // A post whose LMTP delivery to r1 failed at its death or freeze may have been queued
    // there before the poster tried r2: an MTA sends such a post again.
    if matches!(fault, Fault::HostDeath | Fault::HostFreeze) {
        may_double.extend(c.site.lmtp_failed_at("r1"));
    }
    let report = c.last_digests_sent(n).await;
    assert_clean(&report);
    delivered_once_to_mailboxes_digests_and_archive(fault, &c, &report, n, &may_double);
    // Latency: LMTP accepted -> its last delivery at the sink.
    let accepted = c.site.lmtp_accepted();
    assert_eq!(accepted.len(), 2 * n, "every post accepted over LMTP");
    let mut last: BTreeMap<String, f64> = BTreeMap::new();
    for d in c.site.sink.deliveries().into_iter().filter(|d| d.rcpt != DIGEST_MEMBER) {
        let t = last.entry(d.message_id).or_insert(d.t);
        *t = t.max(d.t);
    }
    let mut latency: Vec<f64> = accepted.iter().filter_map(|(id, t)| last.get(id).map(|l| l - t)).collect();
    latency.sort_by(f64::total_cmp);
    println!(
        "{fault:?}: {} posts over LMTP to two nodes, {} allowed a second copy: LMTP accepted -> last delivery p50 {:.2} s, max {:.2} s",
        latency.len(),
        may_double.len(),
        latency[latency.len() / 2],
        latency.last().copied().unwrap_or(f64::NAN)
    );
    latency
}

#[tokio::test]
async fn a_whole_site_takes_posts_over_lmtp_and_delivers_each_once_to_each_member() {
    end_to_end(Fault::None).await;
}

#[tokio::test]
async fn a_whole_site_delivers_each_post_once_through_a_kill_of_a_runner() {
    end_to_end(Fault::KillRunner).await;
}

#[tokio::test]
async fn a_whole_site_delivers_each_post_once_through_a_drain_and_an_uncordon() {
    end_to_end(Fault::DrainAndUncordon).await;
}

#[tokio::test]
async fn a_whole_site_delivers_each_post_once_through_a_live_reslice_of_out_and_in() {
    end_to_end(Fault::Reslice).await;
}

#[tokio::test]
async fn a_whole_site_delivers_each_post_once_through_the_death_of_a_host() {
    end_to_end(Fault::HostDeath).await;
}

#[tokio::test]
async fn a_whole_site_delivers_each_post_once_through_a_host_frozen_past_its_ttl() {
    end_to_end(Fault::HostFreeze).await;
}

#[tokio::test]
async fn a_whole_site_delivers_each_post_once_through_an_smtp_outage() {
    end_to_end(Fault::SmtpOutage).await;
}

/// Watches the `.bak` files of some slices of a site's queues (polled every 20 ms) and
/// collects the Message-IDs of the posts in them (a queue file is a pickle that holds the
/// message's headers as text).
struct BakWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<BTreeSet<String>>,
}

impl BakWatch {
    /// Watches `queue_dir/<queue>` for `.bak` files of the slices `held[queue]` (slice count, slices).
    fn start(queue_dir: &std::path::Path, held: BTreeMap<String, (u32, Vec<u32>)>) -> BakWatch {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (dir, flag) = (queue_dir.to_owned(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut ids = BTreeSet::new();
            let mut read = BTreeSet::new();
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                read_baks(&dir, &held, &mut read, &mut ids);
                std::thread::sleep(Duration::from_millis(20));
            }
            ids
        });
        BakWatch { stop, thread }
    }

    /// Stops watching; the Message-IDs seen.
    fn stop(self) -> BTreeSet<String> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().expect("the watch thread")
    }
}

/// The Message-IDs in the `.bak` files of the slices `held` (as [`BakWatch::start`]) now.
fn baks_in(queue_dir: &std::path::Path, held: &BTreeMap<String, (u32, Vec<u32>)>) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    read_baks(queue_dir, held, &mut BTreeSet::new(), &mut ids);
    ids
}

/// Adds the Message-IDs of each `.bak` of the slices `held` not yet in `read` to `ids`.
fn read_baks(queue_dir: &std::path::Path, held: &BTreeMap<String, (u32, Vec<u32>)>, read: &mut BTreeSet<String>, ids: &mut BTreeSet<String>) {
    for (queue, (count, slices)) in held {
        for entry in std::fs::read_dir(queue_dir.join(queue)).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(parsed) = qslice_proto::slice::EntryName::parse(&name) else { continue };
            if parsed.ext != "bak" || !slices.contains(&parsed.slice(*count)) || !read.insert(name) {
                continue;
            }
            let bytes = std::fs::read(entry.path()).unwrap_or_default();
            ids.extend(message_ids(&bytes));
        }
    }
}

/// The test posts' Message-IDs (`<site-<list>-<n>@example.com>`) in `bytes`.
fn message_ids(bytes: &[u8]) -> BTreeSet<String> {
    let text = String::from_utf8_lossy(bytes);
    let mut out = BTreeSet::new();
    let mut rest = text.as_ref();
    while let Some(i) = rest.find("<site-") {
        let tail = &rest[i..];
        if let Some(end) = tail.find("@example.com>") {
            let id = &tail[..end + "@example.com>".len()];
            if !id[1..].contains('<') {
                out.insert(id.to_owned());
            }
        }
        rest = &tail[1..];
    }
    out
}
