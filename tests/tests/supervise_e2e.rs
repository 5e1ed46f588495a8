//! Supervised Mailman runners (a faithful stand-in for Mailman 3's `runner`, see
//! tests/fixtures/fake_mailman3_runner.py) started per claimed slice by the real runner.

use std::time::Duration;

use nix::sys::signal::Signal;
use qslice_tests::cluster::{assign, claims, put_queue, unassign, Spool};
use qslice_tests::testcluster::{Ready, TestCluster};
use qslice_tests::{process_alive, wait_for, wait_for_async};

const LONG: Duration = Duration::from_secs(60);

/// Writes a runner config that supervises queue `in` with the fake Mailman 3 runner.
fn supervise_config(spool: &Spool, name: &str, extra: &str) -> String {
    let fake = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/fake_mailman3_runner.py");
    let queue_dir = spool.root().join("in");
    let toml = format!(
        "[supervise.in]\nflavour = \"mailman3-runner\"\ncommand = [\"python3\", \"{fake}\", \"{}\", \"{{slice}}\", \"{{slices}}\", \"{}\"]\nenv = [\"PATH\", \"FAKE_BUSY\", \"FAKE_CRASH_ON_NODE\", \"FAKE_MAILMAN2\"]\nstop_timeout = \"20s\"\n{extra}",
        queue_dir.display(),
        spool.records_path().display()
    );
    let path = spool.scratch(name);
    std::fs::write(&path, toml).expect("write config");
    path.to_string_lossy().into_owned()
}

/// A runner config running the stand-in as Mailman 3's `runner` command with `-C
/// mailman_cfg`, so that qslice checks mailman.cfg's `instances`.
fn runner_command_config(spool: &Spool, mailman_cfg: &std::path::Path) -> String {
    let fake = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/fake_mailman3_runner.py");
    let toml = format!(
        "[supervise.in]\nflavour = \"mailman3-runner\"\ncommand = [\"python3\", \"{fake}\", \"{}\", \"{{slice}}\", \"{{slices}}\", \"{}\", \"-C\", \"{}\", \"-r\", \"in:{{slice}}:{{slices}}\"]\nenv = [\"PATH\"]\n",
        spool.root().join("in").display(),
        spool.records_path().display(),
        mailman_cfg.display()
    );
    let cfg = spool.scratch("runner.toml");
    std::fs::write(&cfg, toml).expect("write");
    cfg.to_string_lossy().into_owned()
}

fn pids_of(spool: &Spool, what: &str) -> Vec<(u32, u32)> {
    spool.records().iter().filter(|r| r.what == what).map(|r| (r.slice, r.filebase.parse().expect("pid"))).collect()
}

#[tokio::test]
async fn each_claimed_slice_runs_its_own_mailman_runner_and_its_output_is_logged() {
    let spool = Spool::new(&["in"]).expect("spool");
    let cfg = supervise_config(&spool, "runner.toml", "");
    let tc = TestCluster::builder().spool(spool.clone()).assign("r", "in", 4, 0..4).runner_with("r", &["--config", &cfg], &[]).start().await.expect("cluster");
    let (mut c, r) = (tc.client(), tc.runner("r"));
    wait_for_async(LONG, "4 supervised runners booted", || async { pids_of(&spool, "boot").len() == 4 }).await.expect("booted");
    let mut slices: Vec<u32> = pids_of(&spool, "boot").iter().map(|(s, _)| *s).collect();
    slices.sort();
    assert_eq!(slices, vec![0, 1, 2, 3], "one runner per slice");
    let q = spool.queue("in");
    for i in 0..20u32 {
        q.enqueue_in_slice(format!("m{i}").as_bytes(), i % 4, 4).expect("enqueue");
    }
    wait_for_async(LONG, "20 entries finished", || async { spool.finished().len() == 20 }).await.expect("processed");
    assert!(spool.finished().values().all(|n| *n == 1));
    let held = claims(&mut c, "t", "in").await.expect("claims");
    for rec in spool.records().iter().filter(|r| r.what == "start") {
        assert_eq!(rec.epoch, held[&rec.slice].1, "each runner got its slice's epoch: {rec:?}");
    }
    wait_for(LONG, "child output in the runner's log, tagged", || r.log().contains("fake mailman runner for slice") && r.log().contains("queue=in")).expect("tagged output");
}

#[tokio::test]
async fn a_released_slice_stops_its_runner_between_messages_and_nothing_is_shunted() {
    let spool = Spool::new(&["in"]).expect("spool");
    let cfg = supervise_config(&spool, "runner.toml", "");
    let tc = TestCluster::builder()
        .spool(spool.clone())
        .assign("a", "in", 2, 0..2)
        .runner_args(&["--config", &cfg, "--lease-ttl", "30s"])
        .runner_env(&[("FAKE_BUSY", "0.2")])
        .runners(&["a", "b"])
        .start()
        .await
        .expect("cluster");
    let mut c = tc.client();
    let q = spool.queue("in");
    for i in 0..40u32 {
        q.enqueue_in_slice(format!("m{i}").as_bytes(), i % 2, 2).expect("enqueue");
    }
    wait_for_async(LONG, "a's runners busy", || async { spool.records().iter().any(|r| r.what == "start" && r.node == "a") }).await.expect("busy");
    assign(&mut c, "t", "b", "in", 2, 0..2).await.expect("assign b");
    unassign(&mut c, "t", "a", "in").await.expect("unassign a");
    wait_for_async(LONG, "40 entries finished", || async { spool.finished().len() == 40 }).await.expect("processed");
    wait_for_async(LONG, "b holds both slices", || async { claims(&mut c.clone(), "t", "in").await.is_ok_and(|m| m.len() == 2 && m.values().all(|(n, _)| n == "b")) })
        .await
        .expect("moved");
    let records = spool.records();
    // The runners really were busy for a while per message (so a careless stop signal
    // would have hit one mid-message).
    let busy_ns = records
        .iter()
        .filter(|r| r.what == "end")
        .filter_map(|e| records.iter().find(|s| s.what == "start" && s.filebase == e.filebase && s.node == e.node).map(|s| e.at_ns - s.at_ns))
        .max()
        .expect("some entries");
    assert!(busy_ns >= 150_000_000, "FAKE_BUSY reached the supervised runners ({busy_ns} ns)");
    assert!(!records.iter().any(|r| r.what == "shunt"), "a busy runner was never signalled: {records:?}");
    assert!(!spool.root().join("shunt").exists());
    assert!(spool.finished().values().all(|n| *n == 1), "none twice");
    for slice in 0..2 {
        let a_booted = records.iter().any(|r| r.what == "boot" && r.node == "a" && r.slice == slice);
        let a_started = records.iter().any(|r| r.what == "start" && r.node == "a" && r.slice == slice);
        if !a_booted {
            // Released before its runner got going: a stop signal ends it during start-up.
            assert!(!a_started);
            continue;
        }
        let a_stop = records.iter().filter(|r| r.what == "stop" && r.node == "a" && r.slice == slice).map(|r| r.at_ns).max().unwrap_or_else(|| {
            let lines: Vec<String> = records.iter().map(|r| format!("{} {} {} {}", r.what, r.node, r.slice, r.filebase)).collect();
            panic!("a's runner of slice {slice} recorded no quiet stop:\n{}", lines.join("\n"))
        });
        let b_first = records.iter().filter(|r| r.what == "start" && r.node == "b" && r.slice == slice).map(|r| r.at_ns).min();
        if let Some(b_first) = b_first {
            assert!(b_first > a_stop, "slice {slice}: b's runner worked before a's had stopped");
        }
    }
    let held = claims(&mut c, "t", "in").await.expect("claims");
    assert!(held.values().all(|(n, _)| n == "b"));
}

#[tokio::test]
async fn kill_9_of_the_runner_leaves_no_mailman_process() {
    let spool = Spool::new(&["in"]).expect("spool");
    let cfg = supervise_config(&spool, "runner.toml", "");
    let tc = TestCluster::builder().spool(spool.clone()).assign("r", "in", 2, 0..2).runner_with("r", &["--config", &cfg], &[]).start().await.expect("cluster");
    let r = tc.runner("r");
    wait_for_async(LONG, "2 supervised runners booted", || async { pids_of(&spool, "boot").len() == 2 }).await.expect("booted");
    let pids: Vec<u32> = pids_of(&spool, "boot").into_iter().map(|(_, p)| p).collect();
    assert!(pids.iter().all(|p| process_alive(*p)));
    r.signal(Signal::SIGKILL).expect("kill -9");
    wait_for(LONG, "every supervised runner to die with qslice-runner", || pids.iter().all(|p| !process_alive(*p))).expect("none left");
}

#[tokio::test]
async fn a_runner_that_keeps_crashing_is_given_up_and_another_node_takes_its_slices() {
    let spool = Spool::new(&["in"]).expect("spool");
    let cfg = supervise_config(&spool, "runner.toml", "max_restarts = 2\nrestart_window = \"60s\"\n");
    // bad never holds its share: wait only until it has registered.
    let mut tc = TestCluster::builder()
        .spool(spool.clone())
        .queue("in", 2)
        .coordinators(1)
        .runner_args(&["--config", &cfg])
        .runner_env(&[("FAKE_CRASH_ON_NODE", "bad")])
        .runners(&["bad"])
        .ready(Ready::Registered)
        .start()
        .await
        .expect("cluster");
    let c = tc.client();
    let bad = tc.runner("bad");
    wait_for(LONG, "bad's runners to crash and be given up", || bad.log().contains("giving this queue up")).expect("gave up");
    tc.start_runner("good").expect("runner good");
    wait_for_async(LONG, "good holds both slices", || async { claims(&mut c.clone(), "t", "in").await.is_ok_and(|m| m.len() == 2 && m.values().all(|(n, _)| n == "good")) })
        .await
        .expect("moved");
    let name = spool.queue("in").enqueue(b"m").expect("enqueue").filebase;
    wait_for_async(LONG, "the entry processed by good", || async { spool.finished().contains_key(&name) }).await.expect("processed");
}

#[tokio::test]
async fn a_mailman3_queue_whose_instances_differ_from_its_slices_is_refused() {
    let spool = Spool::new(&["in"]).expect("spool");
    let mailman_cfg = spool.scratch("mailman.cfg");
    std::fs::write(&mailman_cfg, "[runner.in]\ninstances: 2\n").expect("write");
    let cfg = runner_command_config(&spool, &mailman_cfg);
    // The runner refuses the queue: it claims nothing to wait for.
    let tc =
        TestCluster::builder().spool(spool.clone()).assign("r", "in", 4, 0..4).runner_with("r", &["--config", &cfg], &[]).ready(Ready::Registered).start().await.expect("cluster");
    let (mut c, r) = (tc.client(), tc.runner("r"));
    wait_for(LONG, "the mismatch named in the log", || r.log().contains("instances = 2") && r.log().contains("4 slices")).expect("refused");
    assert!(claims(&mut c, "t", "in").await.expect("claims").is_empty(), "nothing claimed under a slicing Mailman would not use");
    let keys = qslice_proto::keys::Keys::new("t").expect("keys");
    let refused = || async {
        let node = c.clone().get(keys.node("r"), None).await.expect("get");
        <qslice_proto::records::NodeRecord as qslice_proto::records::Record>::decode(node.kvs()[0].value()).expect("record").refused_queues
    };
    wait_for_async(LONG, "the refusal published for the coordinator", || async { refused().await == vec!["in".to_owned()] }).await.expect("published");

    // --check-config refuses an instance count Mailman 3 itself would reject.
    std::fs::write(&mailman_cfg, "[runner.in]\ninstances: 3\n").expect("write");
    let out = std::process::Command::new(qslice_tests::qslice_bin("qslice-runner").expect("built"))
        .args(["--config", &cfg, "--spool", "/tmp", "--node-id", "x", "--check-config"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("power of two"), "{}", String::from_utf8_lossy(&out.stderr));
    // The refusal held all along: the count it was refused for is still the assignment's.
    assert_eq!(refused().await, vec!["in"], "the refusal holds while the mismatch does");
    assert!(!r.log().contains("refusal lifted"), "the refusal was lifted while the mismatch lasted: {}", r.log());
}

#[tokio::test]
async fn a_fenced_runner_kills_its_mailman_runners_at_once() {
    let spool = Spool::new(&["in"]).expect("spool");
    let cfg = supervise_config(&spool, "runner.toml", "");
    let tc = TestCluster::builder().spool(spool.clone()).assign("r", "in", 2, 0..2).runner_with("r", &["--config", &cfg], &[]).start().await.expect("cluster");
    let (etcd, r) = (tc.etcd(), tc.runner("r"));
    wait_for_async(LONG, "2 supervised runners booted", || async { pids_of(&spool, "boot").len() == 2 }).await.expect("booted");
    let pids: Vec<u32> = pids_of(&spool, "boot").into_iter().map(|(_, p)| p).collect();
    // etcd freezes: the runner can no longer renew its 2 s lease and fences itself.
    etcd.pause().expect("SIGSTOP etcd");
    wait_for(LONG, "the fenced runner to kill its Mailman runners", || pids.iter().all(|p| !process_alive(*p))).expect("killed");
    // The leash kills them at the same deadline, so the runner's own fence line may come
    // a moment after they are gone.
    wait_for(LONG, "the runner to say it fenced itself", || r.log().contains("fenced")).unwrap_or_else(|e| panic!("{e}: {}", r.log()));
    assert!(r.pid().is_some_and(process_alive), "the runner itself lives on and waits for etcd");
    etcd.resume().expect("SIGCONT etcd");
    // Back in touch, it registers anew and starts fresh runners under new claims.
    wait_for_async(LONG, "new runners after the fence", || async { pids_of(&spool, "boot").len() >= 4 }).await.expect("restarted");
}

#[tokio::test]
async fn a_mailman2_runner_is_stopped_with_sigterm_and_finishes_its_message() {
    let spool = Spool::new(&["in"]).expect("spool");
    let mailman3 = supervise_config(&spool, "runner.toml", "");
    let cfg_path = spool.scratch("runner2.toml");
    let cfg = std::fs::read_to_string(&mailman3).expect("read").replace("flavour = \"mailman3-runner\"", "flavour = \"mailman2\"");
    std::fs::write(&cfg_path, cfg).expect("write");
    let cfg_path = cfg_path.to_string_lossy().into_owned();
    let env = [("FAKE_BUSY", "1"), ("FAKE_MAILMAN2", "1")];
    let tc = TestCluster::builder()
        .spool(spool.clone())
        .assign("a", "in", 1, [0])
        .runner_with("a", &["--config", &cfg_path, "--lease-ttl", "30s"], &env)
        .start()
        .await
        .expect("cluster");
    let mut c = tc.client();
    let name = spool.queue("in").enqueue(b"m").expect("enqueue").filebase;
    wait_for_async(LONG, "a's runner busy", || async { spool.records().iter().any(|r| r.what == "start") }).await.expect("busy");
    unassign(&mut c, "t", "a", "in").await.expect("unassign");
    wait_for_async(LONG, "a's claim released", || async { claims(&mut c.clone(), "t", "in").await.is_ok_and(|m| m.is_empty()) }).await.expect("released");
    let records = spool.records();
    assert!(records.iter().any(|r| r.what == "term-while-busy"), "Mailman 2.1 is signalled at once, even while busy: {records:?}");
    assert!(records.iter().any(|r| r.what == "end" && r.filebase == name), "the message in hand was finished: {records:?}");
    assert!(records.iter().any(|r| r.what == "stop"), "then it stopped: {records:?}");
    assert!(!records.iter().any(|r| r.what == "shunt"));
}

#[tokio::test]
async fn supervised_runners_run_as_the_configured_user() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: switching users needs the tests to run as root");
        return;
    }
    let spool = Spool::new(&["in"]).expect("spool");
    let cfg = spool.scratch("runner.toml");
    std::fs::write(&cfg, "[supervise.in]\nflavour = \"mailman2\"\ncommand = [\"/bin/sh\", \"-c\", \"echo uid=$(id -u) gid=$(id -g) in $(pwd); exec sleep 600\"]\nuser = \"nobody\"\ngroup = \"nogroup\"\nworkdir = \"/\"\n").expect("write");
    let cfg = cfg.to_string_lossy().into_owned();
    let tc = TestCluster::builder().spool(spool.clone()).assign("r", "in", 1, [0]).runner_with("r", &["--config", &cfg], &[]).start().await.expect("cluster");
    let r = tc.runner("r");
    let nobody = nix::unistd::User::from_name("nobody").expect("lookup").expect("nobody exists");
    let nogroup = nix::unistd::Group::from_name("nogroup").expect("lookup").expect("nogroup exists");
    let want = format!("uid={} gid={} in /", nobody.uid, nogroup.gid);
    wait_for(LONG, "the child's identity in the runner's log", || r.log().contains(&want)).unwrap_or_else(|e| panic!("{e}:\n{}", r.log()));
}

#[tokio::test]
async fn a_crashed_runner_is_checked_again_before_its_restart_and_the_refusal_ends_with_the_fix() {
    let spool = Spool::new(&["in"]).expect("spool");
    let mailman_cfg = spool.scratch("mailman.cfg");
    std::fs::write(&mailman_cfg, "[runner.in]\ninstances: 2\n").expect("write");
    let cfg = runner_command_config(&spool, &mailman_cfg);
    let tc = TestCluster::builder().spool(spool.clone()).queue("in", 2).assign("r", "in", 2, 0..2).runner_with("r", &["--config", &cfg], &[]).start().await.expect("cluster");
    let (mut c, r) = (tc.client(), tc.runner("r"));
    wait_for_async(LONG, "2 supervised runners booted", || async { pids_of(&spool, "boot").len() == 2 }).await.expect("booted");
    // mailman.cfg changes under the running children; one of them crashes.
    std::fs::write(&mailman_cfg, "[runner.in]\ninstances: 4\n").expect("write");
    let (_, pid) = pids_of(&spool, "boot")[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill the child");
    wait_for(LONG, "the restart refused, naming the mismatch", || r.log().contains("instances = 4") && r.log().contains("2 slices")).expect("refused");
    assert_eq!(pids_of(&spool, "boot").len(), 2, "no child was started again under a slicing Mailman would not use");
    wait_for_async(LONG, "the queue's claims released", || async { claims(&mut c.clone(), "t", "in").await.map(|m| m.is_empty()).unwrap_or(false) }).await.expect("released");
    // Fixed: the refusal ends at once, not after a cooldown.
    std::fs::write(&mailman_cfg, "[runner.in]\ninstances: 2\n").expect("write");
    put_queue(&mut c, "t", "in", 2).await.expect("queue written again");
    wait_for_async(LONG, "both slices claimed again", || async { claims(&mut c.clone(), "t", "in").await.map(|m| m.len() == 2).unwrap_or(false) }).await.expect("claimed again");
    assert!(r.log().contains("refusal lifted"), "the log says the refusal ended: {}", r.log());
}
