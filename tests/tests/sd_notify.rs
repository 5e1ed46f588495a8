//! systemd integration (`Type=notify` units): the real runner and coordinator, started with
//! `NOTIFY_SOCKET` naming a datagram socket the test binds, report `READY=1` only once they
//! are ready, ping the watchdog at half of `WATCHDOG_USEC`, and report `STOPPING=1` when a
//! SIGTERM starts their graceful stop.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use nix::sys::signal::Signal;
use qslice_tests::cluster::{leader, Spool};
use qslice_tests::testcluster::{Ready, TestCluster};
use qslice_tests::wait::Wait;
use qslice_tests::{free_port, qslice_bin, wait_for_async, Etcd, Proc};

const LONG: Duration = Duration::from_secs(60);

/// The service manager's end of the notify protocol.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    /// Every message received so far, in order.
    seen: Vec<String>,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> Result<NotifySocket> {
        let dir = tempfile::Builder::new().prefix("qslice-notify-").tempdir()?;
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).context("bind the notify socket")?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(NotifySocket { sock, path, seen: Vec::new(), _dir: dir })
    }

    fn env(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    /// Receives until a message has a line equal to `line`; returns how many messages had
    /// arrived before it.
    fn wait_for_line(&mut self, line: &str, timeout: Duration) -> Result<usize> {
        let mut buf = [0u8; 4096];
        // Each look blocks in recv for up to the socket's 100 ms read timeout: no pause.
        let (sock, seen) = (&self.sock, &mut self.seen);
        let found = Wait::new(timeout, &format!("{line:?}")).every(Duration::ZERO).poll(|| {
            if let Some(i) = seen.iter().position(|m| m.lines().any(|l| l == line)) {
                return Ok(Some(i));
            }
            match sock.recv(&mut buf) {
                Ok(n) => seen.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(e.into()),
            }
            Ok(None)
        });
        found.map_err(|e| anyhow!("{e}; received {:?}", self.seen))
    }

    /// How many received messages have a line equal to `line`.
    fn count(&self, line: &str) -> usize {
        self.seen.iter().filter(|m| m.lines().any(|l| l == line)).count()
    }
}

#[tokio::test]
async fn runner_reports_ready_once_registered_and_stopping_on_sigterm() {
    let mut notify = NotifySocket::bind().expect("socket");
    let socket = notify.env();
    // Not waited for: READY=1 is to say when the runner is ready.
    let mut tc = TestCluster::builder().spool_queues(&["in"]).runner_with("r1", &[], &[("NOTIFY_SOCKET", socket.as_str())]).ready(Ready::Started).start().await.expect("cluster");
    notify.wait_for_line("READY=1", LONG).expect("READY=1");
    // Ready means registered (the node record is in etcd) with the assignment read.
    assert!(tc.is_registered("r1").await, "READY=1 came before the node registered");
    let runner = tc.runner_mut("r1");
    assert_eq!(notify.count("STOPPING=1"), 0, "STOPPING=1 before any stop: {:?}", notify.seen);
    assert_eq!(notify.count("WATCHDOG=1"), 0, "watchdog pings without WATCHDOG_USEC: {:?}", notify.seen);

    runner.signal(Signal::SIGTERM).expect("SIGTERM");
    let ready_at = notify.wait_for_line("READY=1", LONG).expect("seen");
    let stopping_at = notify.wait_for_line("STOPPING=1", LONG).expect("STOPPING=1");
    assert!(stopping_at > ready_at, "STOPPING=1 must follow READY=1: {:?}", notify.seen);
    let status = runner.wait_exit(LONG).expect("the runner exits after SIGTERM");
    assert!(status.success(), "graceful stop exits 0, got {status}");
}

#[tokio::test]
async fn runner_pings_the_watchdog_at_half_its_interval() {
    // The runner is started by hand below (under a shell that sets WATCHDOG_PID).
    let tc = TestCluster::builder().spool_queues(&["in"]).start().await.expect("cluster");
    let spool = tc.spool();
    let mut notify = NotifySocket::bind().expect("socket");
    let runner = qslice_bin("qslice-runner").expect("binary");
    let root = spool.root();
    let state = spool.scratch("state-w");
    let endpoint = tc.endpoints();
    let args = [
        "-c",
        // systemd sets WATCHDOG_PID to the main process: the shell's pid is the runner's after exec.
        "export WATCHDOG_PID=$$; exec \"$0\" \"$@\"",
        runner.to_str().expect("utf8"),
        "--node-id",
        "w",
        "--cluster",
        "t",
        "--spool",
        root.to_str().expect("utf8"),
        "--state-dir",
        state.to_str().expect("utf8"),
        "--etcd-endpoints",
        endpoint,
        "--lease-ttl",
        "2s",
        "--handler-command",
        "[\"/bin/true\"]",
    ];
    let socket = notify.env();
    // A 1 s watchdog: pings every 500 ms.
    let envs = [("NOTIFY_SOCKET", socket.as_str()), ("WATCHDOG_USEC", "1000000")];
    let mut proc = Proc::spawn(std::path::Path::new("/bin/sh"), &args, &envs, &spool.scratch("w.log")).expect("runner");
    notify.wait_for_line("READY=1", LONG).expect("READY=1");
    let start = Instant::now();
    let before = notify.count("WATCHDOG=1");
    qslice_tests::wait_for(LONG, "three more watchdog pings", || {
        let _ = notify.wait_for_line("never", Duration::from_millis(100));
        notify.count("WATCHDOG=1") >= before + 3
    })
    .expect("pings");
    // Three pings at 500 ms take at least 1 s (two intervals after the first).
    assert!(start.elapsed() >= Duration::from_millis(900), "pings faster than half the watchdog interval: {:?}", start.elapsed());
    proc.signal(Signal::SIGTERM).expect("SIGTERM");
    notify.wait_for_line("STOPPING=1", LONG).expect("STOPPING=1");
    assert!(proc.wait_exit(LONG).expect("exit").success());
}

fn start_coordinator_notifying(etcd: &Etcd, spool: &Spool, id: &str, socket: &str) -> Result<(Proc, String)> {
    let admin = format!("127.0.0.1:{}", free_port()?);
    let endpoint = etcd.endpoint();
    let args = ["--id", id, "--cluster", "t", "--etcd-endpoints", &endpoint, "--admin-addr", &admin, "--lease-ttl", "2s"];
    let proc = Proc::spawn(&qslice_bin("qslice-coordinator")?, &args, &[("NOTIFY_SOCKET", socket)], &spool.scratch(&format!("{id}.log")))?;
    Ok((proc, admin))
}

#[tokio::test]
async fn leader_and_standby_coordinators_report_ready_once_they_serve_the_admin_api() {
    // The coordinators are started by hand below (with NOTIFY_SOCKET).
    let tc = TestCluster::builder().spool_queues(&["in"]).start().await.expect("cluster");
    let (etcd, spool) = (tc.etcd(), tc.spool());
    let mut n1 = NotifySocket::bind().expect("socket");
    let mut n2 = NotifySocket::bind().expect("socket");
    let (_c1, admin1) = start_coordinator_notifying(etcd, spool, "c1", &n1.env()).expect("c1");
    let (mut c2, admin2) = start_coordinator_notifying(etcd, spool, "c2", &n2.env()).expect("c2");
    n1.wait_for_line("READY=1", LONG).expect("c1 READY=1");
    n2.wait_for_line("READY=1", LONG).expect("c2 READY=1");
    for admin in [&admin1, &admin2] {
        std::net::TcpStream::connect(admin.as_str()).unwrap_or_else(|e| panic!("READY=1 but the admin API at {admin} refuses: {e}"));
    }
    let mut c = tc.client();
    wait_for_async(LONG, "a leader", || async { leader(&mut c.clone(), "t").await.is_some() }).await.expect("leader");
    // Both are ready, so one of them is a ready standby.
    let lead = leader(&mut c, "t").await.expect("a leader");
    assert!(["c1", "c2"].contains(&lead.as_str()), "unexpected leader {lead}");

    c2.signal(Signal::SIGTERM).expect("SIGTERM");
    n2.wait_for_line("STOPPING=1", LONG).expect("c2 STOPPING=1");
    assert!(c2.wait_exit(LONG).expect("exit").success());
    assert_eq!(n1.count("STOPPING=1"), 0, "c1 was not stopped: {:?}", n1.seen);
}
