//! A runner in its own network namespace, cut off from etcd, fences itself before its
//! lease expires in etcd (and so before anyone else can claim its slices).
//!
//! The test makes a namespace and a veth pair itself (test addresses 10.253.x.1/.2 on
//! that pair only) and removes them at the end. Where namespaces cannot be made (no
//! root, no iproute2) it skips with a message.

use std::process::Command;
use std::time::{Duration, SystemTime};

use qslice_common::etcd::{PrefixUpdate, PrefixWatch};
use qslice_proto::keys::Keys;
use qslice_tests::cluster::claims;
use qslice_tests::testcluster::TestCluster;
use qslice_tests::wait_for_async;
use qslice_tests::{qslice_bin, wait_for, Etcd, Proc};

const LONG: Duration = Duration::from_secs(60);

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// A namespace with a veth pair to the host; removed on drop.
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
}

impl Netns {
    fn create() -> Result<Netns, String> {
        let tag: u16 = rand::random::<u16>() % 4096;
        let third = (rand::random::<u8>() % 250) + 1;
        let name = format!("qslice-{}-{tag}", std::process::id());
        let (host_if, ns_if) = (format!("qsh{tag}"), format!("qsn{tag}"));
        let (host_ip, ns_ip) = (format!("10.253.{third}.1"), format!("10.253.{third}.2"));
        ip(&["netns", "add", &name])?;
        let ns = Netns { name: name.clone(), host_if: host_if.clone(), host_ip: host_ip.clone() };
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &ns_if])?;
        ip(&["link", "set", &ns_if, "netns", &name])?;
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip(&["netns", "exec", &name, "ip", "addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if])?;
        ip(&["netns", "exec", &name, "ip", "link", "set", &ns_if, "up"])?;
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn cut(&self) {
        ip(&["link", "set", &self.host_if, "down"]).expect("cut the link");
    }

    fn heal(&self) {
        ip(&["link", "set", &self.host_if, "up"]).expect("restore the link");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn now() -> SystemTime {
    SystemTime::now()
}

/// The time of the first log line containing `needle` (the runner logs RFC 3339 UTC).
fn logged_at(log: &str, needle: &str) -> Option<SystemTime> {
    let line = log.lines().find(|l| l.contains(needle))?;
    humantime::parse_rfc3339_weak(line.split_whitespace().next()?.trim_end_matches('Z')).ok()
}

#[tokio::test]
async fn a_partitioned_runner_fences_itself_before_its_lease_expires() {
    let ns = match Netns::create() {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("skipped: cannot make a network namespace here ({e})");
            return;
        }
    };
    let etcd = Etcd::start_listening_also_on(Some(&ns.host_ip)).expect("etcd");
    // The runner runs in the namespace, started by hand below.
    let tc = TestCluster::builder().etcd(etcd).assign("p", "in", 4, 0..4).start().await.expect("cluster");
    let (spool, c) = (tc.spool(), tc.client());
    let endpoint = format!("http://{}:{}", ns.host_ip, tc.etcd().client_port());
    let runner = qslice_bin("qslice-runner").expect("built");
    let state = spool.scratch("state-p");
    let handler = spool.recording_handler();
    let root = spool.root();
    let args = [
        "netns",
        "exec",
        &ns.name,
        runner.to_str().expect("utf8"),
        "--node-id",
        "p",
        "--cluster",
        "t",
        "--spool",
        root.to_str().expect("utf8"),
        "--state-dir",
        state.to_str().expect("utf8"),
        "--lease-ttl",
        "3s",
        "--etcd-endpoints",
        &endpoint,
        "--handler",
        "exec",
        "--handler-command",
        &handler,
    ];
    let p = Proc::spawn(std::path::Path::new("ip"), &args, &[], &spool.scratch("p.log")).expect("runner in the namespace");
    wait_for_async(LONG, "the runner in the namespace holds 4 claims", || async { claims(&mut c.clone(), "t", "in").await.is_ok_and(|m| m.len() == 4) })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", p.log()));

    // Watch (from outside) for the moment etcd drops the claims: the lease expired.
    let keys = Keys::new("t").expect("keys");
    let mut watch = PrefixWatch::new(c.clone(), keys.queue_claims_prefix("in"));
    let _ = watch.next().await; // the snapshot
    ns.cut();
    let cut_at = now();
    let expired_at = loop {
        match tokio::time::timeout(LONG, watch.next()).await.expect("the lease expires within a minute") {
            PrefixUpdate::Delete(_) => break now(),
            _ => continue,
        }
    };
    wait_for(LONG, "the runner to log its fence", || p.log().contains("fenced")).expect("fenced");
    let fenced_at = logged_at(&p.log(), "fenced").expect("a timestamped fence line");
    let ms = |a: SystemTime, b: SystemTime| b.duration_since(a).map(|d| d.as_millis() as i64).unwrap_or_else(|e| -(e.duration().as_millis() as i64));
    eprintln!("partition: fenced {} ms after the cut, lease expired in etcd {} ms after the cut (TTL 3 s)", ms(cut_at, fenced_at), ms(cut_at, expired_at));
    assert!(fenced_at < expired_at, "the runner stopped work before etcd could give its slices to anyone else");
    ns.heal();
    wait_for_async(LONG, "the runner re-registers and claims again after the partition", || async { claims(&mut c.clone(), "t", "in").await.is_ok_and(|m| m.len() == 4) })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", p.log()));
}
