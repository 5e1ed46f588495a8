//! Least privilege: the roles deploy/etcd/roles.sh creates let runners and coordinators do
//! their work, and a runner's credentials cannot change the assignment.

use std::process::Command;
use std::time::Duration;

use qslice_proto::keys::Keys;
use qslice_proto::records::{Assignment, Record, RECORD_VERSION};
use qslice_tests::cluster::{claims, put_queue};
use qslice_tests::testcluster::TestCluster;
use qslice_tests::wait_for_async;
use qslice_tests::Etcd;

const LONG: Duration = Duration::from_secs(60);

async fn login(etcd: &Etcd, user: &str, password: &str) -> etcd_client::Client {
    let options = etcd_client::ConnectOptions::new().with_user(user, password).with_timeout(Duration::from_secs(5));
    etcd_client::Client::connect(etcd.endpoints(), Some(options)).await.expect("login")
}

#[tokio::test]
async fn roles_let_each_part_work_and_a_runner_cannot_touch_the_assignment() {
    if Command::new("etcdctl").arg("version").output().is_err() {
        panic!("etcdctl is missing: install the etcd-client package (tests/run.sh does)");
    }
    let etcd = Etcd::start().expect("etcd");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/etcd/roles.sh");
    let out = Command::new("bash")
        .arg(script)
        .env("ETCDCTL_API", "3")
        .env("ETCDCTL_ENDPOINTS", etcd.endpoint())
        .envs([("CLUSTER", "t"), ("ROOT_PASSWORD", "rootpw"), ("RUNNER_PASSWORD", "runnerpw"), ("COORDINATOR_PASSWORD", "coordpw")])
        .output()
        .expect("run roles.sh");
    assert!(out.status.success(), "roles.sh failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));

    let mut coordinator = login(&etcd, "qslice-coordinator-t", "coordpw").await;
    put_queue(&mut coordinator, "t", "in", 4).await.expect("the coordinator's user writes configuration");
    let tc = TestCluster::builder()
        .etcd(etcd)
        .client(coordinator.clone())
        .spool_queues(&["in"])
        .coordinators(1)
        .coordinator_args(&["--etcd-user", "qslice-coordinator-t", "--etcd-password", "coordpw"])
        .runner_with("r1", &["--etcd-user", "qslice-runner-t", "--etcd-password", "runnerpw"], &[])
        .start()
        .await
        .expect("cluster");
    let spool = tc.spool();
    wait_for_async(LONG, "the runner claims every slice with its own credentials", || async { claims(&mut coordinator.clone(), "t", "in").await.is_ok_and(|m| m.len() == 4) })
        .await
        .expect("claimed");
    let name = spool.queue("in").enqueue(b"m").expect("enqueue").filebase;
    wait_for_async(LONG, "the entry processed", || async { spool.finished().contains_key(&name) }).await.expect("processed");

    let mut runner = login(tc.etcd(), "qslice-runner-t", "runnerpw").await;
    let keys = Keys::new("t").expect("keys");
    let grab = Assignment { v: RECORD_VERSION, queue: "in".into(), slices_total: 4, slices: (0..4).collect() };
    let err = runner.put(keys.assignment("intruder", "in"), grab.encode(), None).await.expect_err("a runner cannot write the assignment");
    assert!(err.to_string().contains("permission denied"), "{err}");
    let err = runner.delete(keys.queue("in"), None).await.expect_err("nor the configuration");
    assert!(err.to_string().contains("permission denied"), "{err}");
    let other = Keys::new("other").expect("keys");
    let err = runner.put(other.node("x"), "{}", None).await.expect_err("nor another cluster's keys");
    assert!(err.to_string().contains("permission denied"), "{err}");
    runner.get(keys.assignment("r1", "in"), None).await.expect("but it reads its assignment");
}
