//! The real-etcd harness works: start, serve, restart with data kept, pause, and clean up.

use std::time::Duration;

use etcd_client::Client;
use qslice_tests::{process_alive, wait_for, Etcd, Proc};

async fn connect(etcd: &Etcd) -> Client {
    let options = etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_secs(5)).with_timeout(Duration::from_secs(5));
    Client::connect(etcd.endpoints(), Some(options)).await.expect("connect to test etcd")
}

#[tokio::test]
async fn etcd_starts_keeps_data_across_restart_and_is_removed_on_drop() {
    let mut etcd = Etcd::start().expect("etcd starts");
    let mut client = connect(&etcd).await;
    client.put("/qslice/test/k", "v1", None).await.expect("put");

    let first_pid = etcd.pid().expect("running");
    etcd.restart().expect("etcd restarts");
    assert_ne!(etcd.pid(), Some(first_pid));
    assert!(!process_alive(first_pid), "the old etcd is gone");
    let mut client = connect(&etcd).await;
    let got = client.get("/qslice/test/k", None).await.expect("get after restart");
    assert_eq!(got.kvs()[0].value(), b"v1", "data survives a restart");

    etcd.stop();
    assert!(!etcd.is_healthy());
    etcd.restart().expect("etcd starts after a stop");
    assert!(etcd.is_healthy());

    let pid = etcd.pid().expect("running");
    let data = etcd.data_dir();
    drop(etcd);
    assert!(!process_alive(pid), "etcd is killed on drop");
    assert!(!data.exists(), "the data dir is removed on drop");
}

#[tokio::test]
async fn paused_etcd_does_not_answer_until_resumed() {
    let etcd = Etcd::start().expect("etcd starts");
    etcd.pause().expect("SIGSTOP");
    assert!(!etcd.is_healthy(), "a stopped etcd cannot answer");
    etcd.resume().expect("SIGCONT");
    wait_for(Duration::from_secs(30), "etcd answers after SIGCONT", || etcd.is_healthy()).expect("healthy");
}

#[tokio::test]
async fn two_harnesses_run_side_by_side_on_their_own_ports() {
    let a = Etcd::start().expect("first etcd");
    let b = Etcd::start().expect("second etcd");
    assert_ne!(a.endpoint(), b.endpoint());
    let mut ca = connect(&a).await;
    let mut cb = connect(&b).await;
    ca.put("k", "a", None).await.expect("put a");
    let got = cb.get("k", None).await.expect("get b");
    assert!(got.kvs().is_empty(), "the two etcds share nothing");
}

#[test]
fn a_child_process_is_killed_on_drop_and_its_output_captured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("child.log");
    let child = Proc::spawn(std::path::Path::new("/bin/sh"), &["-c", "echo started; exec sleep 600"], &[], &log).expect("spawn");
    let pid = child.pid().expect("running");
    wait_for(Duration::from_secs(10), "the child to print", || child.log().contains("started")).expect("output");
    assert!(process_alive(pid));
    drop(child);
    assert!(!process_alive(pid), "the child is killed on drop");
}
