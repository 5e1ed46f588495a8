//! Ownership under faults, end to end: unknown outcomes of etcd requests (a claim that
//! committed though its answer was lost, a claim delete that failed), the reslice barrier,
//! stranded `.bak` files and failed finishes, open errors that must never quarantine mail,
//! and recovery counts that only crashes and poison mail raise, never qslice's own kills.
//!
//! Faults come from the test beds (`qslice_testbeds`): an etcd proxy that loses replies
//! and a FUSE pass-through file system that lies about renames and fails opens; and from
//! etcd itself (stopped, restarted, paused).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use etcd_client::Client;
use qslice_proto::keys::Keys;
use qslice_proto::records::{Claim, Record, RECORD_VERSION};
use qslice_runner::claims::{claim_slice, release_claim, ClaimOutcome, QueueRevision};
use qslice_testbeds::faultfs::{Fault, FaultFs, Match, OpenErrno};
use qslice_testbeds::proxy::{EtcdProxy, ProxyMode};
use qslice_tests::cluster::{assign, claims, client, files_in, put_queue, start_runner, start_runner_at, unassign, Spool};
use qslice_tests::{wait_for, wait_for_async, Etcd, Proc};

/// Generous bound for what takes a second or two on an idle machine (two loaded cores).
const LONG: Duration = Duration::from_secs(60);

/// The runner fenced itself (its log line when it stops all work).
const FENCED: &str = "fenced: stopped all work";

fn keys() -> Keys {
    Keys::new("t").expect("keys")
}

/// The claim of `queue`'s `slice`, if any: holder node and epoch.
async fn claim_of(c: &mut Client, queue: &str, slice: u32) -> Option<(String, i64)> {
    claims(c, "t", queue).await.ok()?.remove(&slice)
}

/// How many lines of `log` contain any of `needles`.
fn count_lines(log: &str, needles: &[&str]) -> usize {
    log.lines().filter(|l| needles.iter().any(|n| l.contains(n))).count()
}

/// A runner's `/metrics` page (empty if it does not answer).
fn metrics(addr: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return String::new() };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The spool seen through a fault-injecting FUSE mount: runners see the spool through
/// the mount; the test writes and looks at the spool root (another host's view, without faults).
struct FaultySpool {
    /// Unmounted first (fields drop in order), before the spool's directory goes.
    fs: FaultFs,
    spool: Spool,
}

impl FaultySpool {
    fn new(queues: &[&str]) -> Result<FaultySpool> {
        let spool = Spool::new(queues)?;
        let mount = spool.scratch("mnt");
        std::fs::create_dir_all(&mount)?;
        let fs = FaultFs::mount(&spool.root(), &mount).context("mount the fault file system (root and /dev/fuse needed)")?;
        spool.serve_runners_from(fs.mountpoint())?;
        Ok(FaultySpool { fs, spool })
    }

    /// Starts a runner whose spool is the FUSE mount.
    fn start_runner(&self, etcd: &Etcd, node: &str, extra: &[&str]) -> Result<Proc> {
        start_runner(etcd, &self.spool, node, "t", extra, &[])
    }
}

/// Clears the immutable flag of every file in a directory on drop, so that a failing
/// test leaves nothing its temporary directory cannot remove.
struct Mutable(PathBuf);

impl Drop for Mutable {
    fn drop(&mut self) {
        for name in files_in(&self.0) {
            let _ = std::process::Command::new("chattr").arg("-i").arg(self.0.join(name)).status();
        }
    }
}

fn baks(dir: &Path) -> Vec<String> {
    files_in(dir).into_iter().filter(|n| n.ends_with(".bak")).collect()
}

// 1a. A claim request whose answer is lost has committed: the runner adopts its own claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_committed_though_its_answer_was_lost_is_adopted_and_its_slice_processed() -> Result<()> {
    let etcd = Etcd::start()?;
    let proxy = EtcdProxy::start(format!("127.0.0.1:{}", etcd.client_port()).parse()?)?;
    let spool = Spool::new(&["in", "out"])?;
    let mut c = client(&etcd).await?;
    // Another holder has the slice until the test revokes its lease.
    let other = c.lease_grant(60, None).await?.id();
    let record = Claim { v: RECORD_VERSION, node_id: "other".into(), incarnation: uuid::Uuid::new_v4(), slices_total: 1, claimed_unix_ms: 0 };
    c.put(keys().claim("in", 0), record.encode(), Some(etcd_client::PutOptions::new().with_lease(other))).await?;
    assign(&mut c, "t", "a", "in", 1, [0]).await?;
    // A free slice: once a holds it, a has read its assignment and tries `in` every 100 ms.
    assign(&mut c, "t", "a", "out", 1, [0]).await?;
    // A TTL well above the window without answers, so that the runner does not fence (a
    // fence would revoke its lease and hide what is tested).
    let a = start_runner_at(&proxy.endpoint(), &spool, "a", "t", &["--lease-ttl", "8s"], &[])?;
    wait_for_async(LONG, "runner a to claim the free slice", || {
        let mut c = c.clone();
        async move { claim_of(&mut c, "out", 0).await.is_some_and(|(node, _)| node == "a") }
    })
    .await?;
    let name = spool.queue("in").enqueue(b"m")?.filebase;

    // etcd's answers are lost from now on; the slice is freed, and the runner's claim
    // (it retries every 100 ms) commits without its answer.
    proxy.set(ProxyMode::DropReplies { close_after: Duration::from_millis(200) });
    c.lease_revoke(other).await?;
    wait_for_async(LONG, "a's claim to commit", || {
        let mut c = c.clone();
        async move { claim_of(&mut c, "in", 0).await.is_some_and(|(node, _)| node == "a") }
    })
    .await
    .with_context(|| format!("a's log:\n{}", a.log()))?;
    let (_, epoch) = claim_of(&mut c, "in", 0).await.context("a's claim")?;
    // Claims are tried one after the other: a failure logged after the claim committed
    // means the committed one is over (its answer lost).
    let failures = |log: &str| count_lines(log, &["claim failed", "claim timed out"]);
    let seen = failures(&a.log());
    wait_for(LONG, "a's next claim attempt to fail without an answer", || failures(&a.log()) > seen)?;
    proxy.set(ProxyMode::Pass);

    wait_for_async(LONG, "a to process the slice under the claim it adopted", || async {
        spool.records().iter().any(|r| r.what == "end" && r.filebase == name && r.node == "a" && r.epoch == epoch)
    })
    .await?;
    ensure!(!a.log().contains(FENCED), "a fenced itself, which would hide the lost answer:\n{}", a.log());
    ensure!(proxy.counters().bytes_dropped > 0, "the proxy lost replies: {:?}", proxy.counters());
    Ok(())
}

// 1b. A claim delete that failed is retried until it goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_delete_that_failed_is_retried_so_the_next_owner_can_claim() -> Result<()> {
    let mut etcd = Etcd::start()?;
    let spool = Spool::new(&["in"])?;
    let q = spool.queue("in");
    let mut c = client(&etcd).await?;
    assign(&mut c, "t", "a", "in", 1, [0]).await?;
    // A worker coprocess that, once the release closed its stdin (the drain is over and
    // the claim's delete comes next), says so and waits for the test to stop etcd.
    let (eof, go) = (spool.scratch("worker-eof"), spool.scratch("go"));
    let script = format!("while read p; do echo ok; done; touch {}; while [ ! -e {} ]; do sleep 0.05; done", eof.display(), go.display());
    let worker = serde_json::to_string(&["/bin/sh", "-c", &script])?;
    // A TTL well above the time etcd is down, so that neither runner fences.
    let ttl = ["--lease-ttl", "15s"];
    let a = start_runner(&etcd, &spool, "a", "t", &ttl, &[("QSLICE_HANDLER", "worker"), ("QSLICE_HANDLER_COMMAND", &worker)])?;
    let b = start_runner(&etcd, &spool, "b", "t", &ttl, &[])?;
    let first = q.enqueue(b"first")?.filebase;
    wait_for(LONG, "a's worker to finish the first entry", || !files_in(q.dir()).iter().any(|n| n.starts_with(&first)))?;

    assign(&mut c, "t", "b", "in", 1, [0]).await?;
    unassign(&mut c, "t", "a", "in").await?;
    wait_for(LONG, "a's release to close its worker's stdin", || eof.exists())?;
    etcd.stop();
    std::fs::write(&go, b"")?;
    wait_for(LONG, "a's claim delete to fail while etcd is down", || a.log().contains("deleting the claim failed"))?;
    etcd.restart()?;

    let c = client(&etcd).await?;
    wait_for_async(LONG, "b to claim the slice a released", || {
        let mut c = c.clone();
        async move { claim_of(&mut c, "in", 0).await.is_some_and(|(node, _)| node == "b") }
    })
    .await?;
    let second = q.enqueue(b"second")?.filebase;
    wait_for_async(LONG, "b to process an entry of the slice", || async { spool.records().iter().any(|r| r.what == "end" && r.filebase == second && r.node == "b") }).await?;
    ensure!(!a.log().contains(FENCED), "a fenced itself (its lease revoked would hide the failed delete):\n{}", a.log());
    drop(b);
    Ok(())
}

// 2. The reslice barrier in the claim transaction, against a real etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_under_a_queue_configuration_that_changed_since_it_was_read_fails() -> Result<()> {
    let etcd = Etcd::start()?;
    let mut c = client(&etcd).await?;
    let keys = keys();
    let lease = c.lease_grant(60, None).await?.id();
    let record = |total| Claim { v: RECORD_VERSION, node_id: "a".into(), incarnation: uuid::Uuid::new_v4(), slices_total: total, claimed_unix_ms: 0 };
    let revision = |c: &mut Client, queue: &str| {
        let (mut c, key) = (c.clone(), keys.queue(queue));
        async move { c.get(key, None).await.map(|r| r.kvs().first().map(|kv| kv.mod_revision())) }
    };
    put_queue(&mut c, "t", "in", 4).await?;
    let read_at = QueueRevision::At(revision(&mut c, "in").await?.context("queue record")?);
    // The queue is resliced after the runner read its configuration.
    put_queue(&mut c, "t", "in", 8).await?;
    let stale = claim_slice(&mut c, &keys, "in", 0, &record(4), lease, read_at).await?;
    ensure!(matches!(stale, ClaimOutcome::QueueChanged { .. }), "a claim under the old count must fail: {stale:?}");
    ensure!(claim_of(&mut c, "in", 0).await.is_none(), "and leave no claim");
    // A queue with a record is not claimed as one without; one without is.
    let absent = claim_slice(&mut c, &keys, "in", 0, &record(8), lease, QueueRevision::Absent).await?;
    ensure!(matches!(absent, ClaimOutcome::QueueChanged { .. }), "{absent:?}");
    let now = QueueRevision::At(revision(&mut c, "in").await?.context("queue record")?);
    let ClaimOutcome::Claimed { epoch } = claim_slice(&mut c, &keys, "in", 0, &record(8), lease, now).await? else {
        anyhow::bail!("a claim under the configuration in force is made");
    };
    let free = claim_slice(&mut c, &keys, "out", 0, &record(2), lease, QueueRevision::Absent).await?;
    ensure!(matches!(free, ClaimOutcome::Claimed { .. }), "a queue without a record is claimed: {free:?}");
    // The same lease finds its own claim: adopted, with its epoch and count; another lease does not.
    let again = claim_slice(&mut c, &keys, "in", 0, &record(8), lease, now).await?;
    ensure!(again == ClaimOutcome::Adopted { epoch, slices_total: 8 }, "{again:?}");
    let other = c.lease_grant(60, None).await?.id();
    let held = claim_slice(&mut c, &keys, "in", 0, &record(8), other, now).await?;
    ensure!(matches!(held, ClaimOutcome::HeldByOther { .. }), "{held:?}");
    release_claim(&mut c, &keys, "in", 0, epoch).await?;
    ensure!(claim_of(&mut c, "in", 0).await.is_none(), "released");
    Ok(())
}

// 2. The runner does not claim under an assignment whose count the queue no longer has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_claims_nothing_under_a_slice_count_its_queue_no_longer_has() -> Result<()> {
    let etcd = Etcd::start()?;
    let spool = Spool::new(&["in", "out"])?;
    let mut c = client(&etcd).await?;
    // `in` was resliced to 8 while the assignment still says 4; `out` agrees with its record.
    put_queue(&mut c, "t", "in", 8).await?;
    assign(&mut c, "t", "a", "in", 4, 0..4).await?;
    put_queue(&mut c, "t", "out", 2).await?;
    assign(&mut c, "t", "a", "out", 2, 0..2).await?;
    let _a = start_runner(&etcd, &spool, "a", "t", &[], &[])?;
    wait_for_async(LONG, "a to claim out's slices", || {
        let mut c = c.clone();
        async move { claims(&mut c, "t", "out").await.is_ok_and(|h| h.len() == 2) }
    })
    .await?;
    let early = claims(&mut c, "t", "in").await?;
    ensure!(early.is_empty(), "claims under a count the queue no longer has: {early:?}");
    // The count the assignment names comes back: the runner claims.
    put_queue(&mut c, "t", "in", 4).await?;
    wait_for_async(LONG, "a to claim in's slices once the counts agree", || {
        let mut c = c.clone();
        async move { claims(&mut c, "t", "in").await.is_ok_and(|h| h.len() == 4) }
    })
    .await?;
    Ok(())
}

// 5. A .bak that a rename left behind while reporting ENOENT (an NFS retransmit) is
// recovered by its owner once it is older than the handler timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bak_stranded_by_a_rename_reported_as_failed_is_recovered_by_its_owner() -> Result<()> {
    let etcd = Etcd::start()?;
    let fs = FaultySpool::new(&["in"])?;
    let q = fs.spool.queue("in");
    let mut c = client(&etcd).await?;
    assign(&mut c, "t", "a", "in", 1, [0]).await?;
    let a = fs.start_runner(&etcd, "a", &["--handler-timeout", "2s"])?;
    wait_for_async(LONG, "a to claim the slice", || {
        let mut c = c.clone();
        async move { claim_of(&mut c, "in", 0).await.is_some() }
    })
    .await?;
    // The take's rename (.pck to .bak) is done and reported as ENOENT: the runner thinks
    // someone else took the entry.
    fs.fs.set(Fault::RenameThenEnoent(Match::suffix(".pck").times(1)))?;
    let name = q.enqueue(b"m")?.filebase;
    wait_for(LONG, "the rename to be done and reported as failed", || fs.fs.counters().is_ok_and(|n| n.renames_then_enoent == 1))?;
    wait_for_async(LONG, "the stranded entry to be recovered and processed", || async { fs.spool.finished().get(&name) == Some(&1) && baks(q.dir()).is_empty() }).await?;
    ensure!(a.log().contains("stranded"), "a said it recovered a stranded .bak:\n{}", a.log());
    ensure!(files_in(q.bad_dir()).is_empty(), "nothing went to bad/");
    ensure!(fs.spool.finished().get(&name) == Some(&1), "processed once: {:?}", fs.spool.finished());
    Ok(())
}

// 5. A finish that failed is retried while the claim holds; the entry stays .bak meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finish_that_failed_is_retried_until_the_bak_is_gone() -> Result<()> {
    let etcd = Etcd::start()?;
    let spool = Spool::new(&["in"])?;
    let q = spool.queue("in");
    let _mutable = Mutable(q.dir().to_owned());
    let mut c = client(&etcd).await?;
    assign(&mut c, "t", "a", "in", 1, [0]).await?;
    // The handler makes its .bak immutable: the runner's unlink fails (EPERM) until the
    // test clears the flag, like a spool server refusing it for a while.
    let runs = spool.scratch("runs");
    let script = format!("chattr +i \"$QSLICE_PATH\" && echo \"$QSLICE_PATH\" >> {}", runs.display());
    let handler = serde_json::to_string(&["/bin/sh", "-c", &script])?;
    let a = start_runner(&etcd, &spool, "a", "t", &[], &[("QSLICE_HANDLER_COMMAND", &handler)])?;
    let name = q.enqueue(b"m")?.filebase;
    wait_for(LONG, "a's finish to fail", || a.log().contains("cannot finish"))?;
    let bak = q.dir().join(format!("{name}.bak"));
    ensure!(bak.exists(), "the entry stays .bak while its finish fails");
    ensure!(std::process::Command::new("chattr").arg("-i").arg(&bak).status()?.success(), "chattr -i");
    wait_for(LONG, "the retried finish to unlink the .bak", || files_in(q.dir()).is_empty())?;
    let handled = std::fs::read_to_string(&runs)?.lines().count();
    ensure!(handled == 1, "the handler ran once ({handled} times)");
    ensure!(files_in(q.bad_dir()).is_empty(), "nothing went to bad/");
    ensure!(a.log().contains("alert: cannot finish"), "the failure was alerted:\n{}", a.log());
    Ok(())
}

// 6. An entry that cannot be opened is retried, alerted and counted, never quarantined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_that_cannot_be_opened_is_retried_and_alerted_never_quarantined() -> Result<()> {
    let etcd = Etcd::start()?;
    let fs = FaultySpool::new(&["in"])?;
    let q = fs.spool.queue("in");
    let mut c = client(&etcd).await?;
    assign(&mut c, "t", "a", "in", 1, [0]).await?;
    let addr = format!("127.0.0.1:{}", qslice_tests::free_port()?);
    let a = fs.start_runner(&etcd, "a", &["--metrics-addr", &addr])?;
    wait_for_async(LONG, "a to claim the slice", || {
        let mut c = c.clone();
        async move { claim_of(&mut c, "in", 0).await.is_some() }
    })
    .await?;
    // The taken entry (.bak) cannot be opened three times: out of file descriptors.
    fs.fs.set(Fault::OpenError { errno: OpenErrno::Emfile, matching: Match::suffix(".bak").times(3) })?;
    let name = q.enqueue(b"m")?.filebase;
    wait_for_async(LONG, "the entry to be processed once the opens work again", || async { fs.spool.finished().get(&name) == Some(&1) }).await?;
    ensure!(fs.fs.counters()?.open_errors == 3, "three opens failed: {:?}", fs.fs.counters()?);
    ensure!(files_in(q.quarantine_dir()).is_empty(), "nothing quarantined: {:?}", files_in(q.quarantine_dir()));
    let log = a.log();
    let alert = log.lines().find(|l| l.contains("alert: cannot open a queue entry")).with_context(|| format!("no open alert:\n{log}"))?;
    ensure!(alert.contains("EMFILE") && alert.contains(&name) && alert.contains("queue=in"), "the alert names queue, file and errno: {alert}");
    ensure!(count_lines(&log, &["alert: cannot open"]) == 1, "alerts are rate-limited:\n{log}");
    wait_for(LONG, "the open errors in /metrics", || metrics(&addr).lines().any(|l| l == "qslice_runner_spool_errors_total{queue=\"in\",op=\"open\"} 3"))?;
    Ok(())
}

// 7. A handler qslice kills at the drain timeout leaves a .bak whose recovery does not count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_timeout_kill_does_not_count_toward_bad() -> Result<()> {
    let etcd = Etcd::start()?;
    let spool = Spool::new(&["in"])?;
    let q = spool.queue("in");
    let mut c = client(&etcd).await?;
    assign(&mut c, "t", "a", "in", 1, [0]).await?;
    let ttl = ["--lease-ttl", "30s"];
    let a = start_runner(&etcd, &spool, "a", "t", &[ttl[0], ttl[1], "--drain-timeout", "1s"], &[("QSLICE_TEST_DELAY", "600")])?;
    let _b = start_runner(&etcd, &spool, "b", "t", &ttl, &[])?;
    let name = q.enqueue(b"good mail")?.filebase;
    wait_for_async(LONG, "a to start the entry", || async { spool.records().iter().any(|r| r.node == "a") }).await?;
    assign(&mut c, "t", "b", "in", 1, [0]).await?;
    unassign(&mut c, "t", "a", "in").await?;
    wait_for_async(LONG, "b to finish the entry a was killed on", || async { spool.records().iter().any(|r| r.what == "end" && r.node == "b" && r.filebase == name) }).await?;
    ensure!(a.log().contains("drain timeout"), "a killed the work at the drain timeout:\n{}", a.log());
    let count = q.recovery_count(&name)?;
    ensure!(count == 0, "qslice's own kill counted as a recovery ({count})");
    ensure!(!q.is_marked_stopped(&name), "the stop mark was used by the recovery");
    Ok(())
}

// 7. So does a handler killed by the fence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_kill_does_not_count_toward_bad() -> Result<()> {
    let etcd = Etcd::start()?;
    let spool = Spool::new(&["in"])?;
    let q = spool.queue("in");
    let mut c = client(&etcd).await?;
    assign(&mut c, "t", "a", "in", 1, [0]).await?;
    let a = start_runner(&etcd, &spool, "a", "t", &[], &[("QSLICE_TEST_DELAY", "600")])?;
    let name = q.enqueue(b"good mail")?.filebase;
    wait_for_async(LONG, "a to start the entry", || async { spool.records().iter().any(|r| r.node == "a") }).await?;
    let first = spool.records()[0].epoch;
    // etcd freezes past the TTL: a fences itself and kills the handler.
    etcd.pause()?;
    let fenced = wait_for(LONG, "a to fence itself", || a.log().contains(FENCED));
    etcd.resume()?;
    fenced?;
    wait_for_async(LONG, "a to take the entry again under a new claim", || async { spool.records().iter().any(|r| r.what == "start" && r.filebase == name && r.epoch > first) })
        .await?;
    let count = q.recovery_count(&name)?;
    ensure!(count == 0, "the fence's kill counted as a recovery ({count})");
    Ok(())
}
