//! qslicectl, the real binary, against a real cluster: every subcommand, tables and
//! JSON, address fallback, token and validation failures, exit codes.

use std::process::Command;
use std::time::Duration;

use qslice_tests::cluster::{holdings, Spool};
use qslice_tests::testcluster::TestCluster;
use qslice_tests::wait_for_async;
use qslice_tests::{free_port, qslice_bin};

const LONG: Duration = Duration::from_secs(60);

struct Ctl {
    coordinator: String,
}

impl Ctl {
    fn run(&self, token: Option<&str>, args: &[&str]) -> (i32, String, String) {
        let mut cmd = Command::new(qslice_bin("qslicectl").expect("built"));
        cmd.args(["--coordinator", &self.coordinator]).args(args).env_remove("QSLICE_TOKEN");
        if let Some(t) = token {
            cmd.env("QSLICE_TOKEN", t);
        }
        let out = cmd.output().expect("run qslicectl");
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// Runs a command that must succeed; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.run(Some("tok"), args);
        assert_eq!(code, 0, "qslicectl {args:?} failed: {err}");
        out
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.ok(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("qslicectl {args:?} printed no JSON ({e}): {out}"))
    }
}

#[tokio::test]
async fn every_subcommand_works_against_a_live_cluster() {
    let tc = TestCluster::builder().spool_queues(&["in"]).coordinators(1).coordinator_args(&["--admin-token", "tok"]).runners(&["r1", "r2"]).start().await.expect("cluster");
    let mut c = tc.client();
    // The first address has nobody listening: qslicectl tries the next.
    let dead = format!("127.0.0.1:{}", free_port().expect("port"));
    let ctl = Ctl { coordinator: format!("{dead},{}", tc.coordinator("c1").admin) };
    wait_for_async(LONG, "qslicectl sees both nodes", || async {
        let (code, out, _) = ctl.run(None, &["--json", "nodes"]);
        code == 0 && serde_json::from_str::<serde_json::Value>(&out).is_ok_and(|v| v.as_array().is_some_and(|a| a.len() == 2))
    })
    .await
    .expect("nodes");

    refusals_and_their_exit_codes(&ctl);
    ctl.ok(&["queue", "set", "in", "--slices", "4"]);
    wait_for_async(LONG, "2 slices each", || async {
        let h = holdings(&mut c.clone(), "t", "in").await;
        h.len() == 2 && h.values().all(|v| v.len() == 2)
    })
    .await
    .expect("balanced");
    status_tables_and_json(&ctl);
    cordon_pin_and_move(&ctl, &mut c).await;
    rebalance_under_maintenance(&ctl, &mut c).await;
    ctl.ok(&["queue", "pause", "in"]);
    wait_for_async(LONG, "no claims while paused", || async { holdings(&mut c.clone(), "t", "in").await.is_empty() }).await.expect("pause");
    ctl.ok(&["queue", "resume", "in"]);
    wait_for_async(LONG, "claims back", || async { holdings(&mut c.clone(), "t", "in").await.values().map(Vec::len).sum::<usize>() == 4 }).await.expect("resume");

    // drain streams progress and ends done; events prints what happens.
    let out = ctl.ok(&["drain", "r1", "--timeout-seconds", "60"]);
    assert!(out.contains("drained"), "{out}");
    assert_eq!(holdings(&mut c, "t", "in").await.get("r2").map(Vec::len), Some(4));
    let events = std::thread::spawn({
        let coordinator = ctl.coordinator.clone();
        move || Ctl { coordinator }.json_lines(&["events"])
    });
    ctl.ok(&["uncordon", "r1"]);
    let lines = events.join().expect("events thread");
    assert!(lines.iter().all(|l| l.get("kind").is_some()), "{lines:?}");
    ctl.ok(&["queue", "delete", "in"]);
    wait_for_async(LONG, "no claims after delete", || async { holdings(&mut c.clone(), "t", "in").await.is_empty() }).await.expect("delete");
}

/// Auth, validation and usage failures and their exit codes.
fn refusals_and_their_exit_codes(ctl: &Ctl) {
    let (code, _, err) = ctl.run(None, &["queue", "set", "in", "--slices", "4"]);
    assert_eq!(code, 1);
    assert!(err.contains("UNAUTHENTICATED"), "{err}");
    let (code, _, err) = ctl.run(Some("nope"), &["queue", "set", "in", "--slices", "4"]);
    assert_eq!(code, 1);
    assert!(err.contains("PERMISSION_DENIED"), "{err}");
    let (code, _, err) = ctl.run(Some("tok"), &["queue", "set", "in", "--slices", "6", "--mailman3"]);
    assert_eq!(code, 1);
    assert!(err.contains("INVALID_ARGUMENT") && err.contains("slices"), "{err}");
    let (code, _, err) = ctl.run(Some("tok"), &["cordon", "ghost"]);
    assert_eq!(code, 1);
    assert!(err.contains("NOT_FOUND"), "{err}");
    let (code, _, _) = ctl.run(Some("tok"), &["queue", "set", "in"]);
    assert_eq!(code, 2, "a usage error exits 2");
}

/// `status` in tables whose columns say what they are (and `status --help` explains each)
/// and in JSON; `queues`.
fn status_tables_and_json(ctl: &Ctl) {
    let table = ctl.ok(&["status", "--slices"]);
    assert!(table.contains("c1") && table.contains("r1") && table.contains("r2"), "{table}");
    let header = |first: &str, has: &str| table.lines().find(|l| l.starts_with(first) && l.contains(has)).unwrap_or_else(|| panic!("no {first}..{has} table:\n{table}")).to_owned();
    let columns = |line: String| line.split("  ").map(str::trim).filter(|c| !c.is_empty()).map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(columns(header("NODE ", "HOST")), ["NODE", "HOST", "STATE", "WEIGHT", "SLICES HELD", "QUEUES", "UP", "VERSION"], "{table}");
    assert_eq!(columns(header("QUEUE ", "SLICES ")), ["QUEUE", "SLICES", "FLAVOUR", "STATE"], "{table}");
    assert_eq!(
        columns(header("QUEUE ", "ASSIGNED TO")),
        ["QUEUE", "SLICE", "ASSIGNED TO", "CLAIMED BY", "EPOCH", "WAITING", "OLDEST WAITING", "OLDEST IN FLIGHT", "UNOWNED FOR"],
        "{table}"
    );
    let queue_row = table.lines().find(|l| l.starts_with("in ")).unwrap_or_else(|| panic!("no row of queue in:\n{table}"));
    assert!(queue_row.contains("Mailman 2.1"), "the flavour in words: {queue_row}");
    assert!(table.lines().any(|l| l.starts_with("r1 ") && l.contains(" all ")), "r1 serves all queues: {table}");
    let help = ctl.ok(&["status", "--help"]);
    for column in ["SLICES HELD", "FLAVOUR", "Mailman 3", "ASSIGNED TO", "CLAIMED BY", "EPOCH", "OLDEST IN FLIGHT", "UNOWNED FOR", "[desired_owner, pinned]"] {
        assert!(help.contains(column), "status --help does not explain {column}:\n{help}");
    }
    let status = ctl.json(&["status", "--slices"]);
    assert_eq!(status["slices"].as_array().map(Vec::len), Some(4), "{status}");
    let queues = ctl.json(&["queues"]);
    assert_eq!(queues[0]["slices"], 4, "{queues}");
    assert!(ctl.ok(&["queues"]).contains("in"));
}

/// Cordon and uncordon, pin and unpin, move.
async fn cordon_pin_and_move(ctl: &Ctl, c: &mut etcd_client::Client) {
    ctl.ok(&["cordon", "r1"]);
    wait_for_async(LONG, "r2 holds all 4", || async { holdings(&mut c.clone(), "t", "in").await.get("r2").is_some_and(|v| v.len() == 4) }).await.expect("cordon");
    ctl.ok(&["uncordon", "r1"]);
    wait_for_async(LONG, "balanced again", || async {
        let h = holdings(&mut c.clone(), "t", "in").await;
        h.len() == 2 && h.values().all(|v| v.len() == 2)
    })
    .await
    .expect("uncordon");
    let h = holdings(c, "t", "in").await;
    let s = h["r1"][0].to_string();
    ctl.ok(&["pin", "in", &s, "r2"]);
    wait_for_async(LONG, "the pinned slice on r2", || async { holdings(&mut c.clone(), "t", "in").await.get("r2").is_some_and(|v| v.contains(&h["r1"][0])) }).await.expect("pin");
    ctl.ok(&["unpin", "in", &s]);
    let other = h["r1"][1].to_string();
    ctl.ok(&["move", "in", &other, "r2"]);
    wait_for_async(LONG, "the moved slice on r2", || async { holdings(&mut c.clone(), "t", "in").await.get("r2").is_some_and(|v| v.contains(&h["r1"][1])) }).await.expect("move");
}

/// An imbalance frozen under maintenance: the dry run shows what would move, and an applied
/// rebalance is refused until maintenance is off.
async fn rebalance_under_maintenance(ctl: &Ctl, c: &mut etcd_client::Client) {
    ctl.ok(&["cordon", "r1"]);
    wait_for_async(LONG, "r2 holds all 4", || async { holdings(&mut c.clone(), "t", "in").await.get("r2").is_some_and(|v| v.len() == 4) }).await.expect("cordon");
    ctl.ok(&["maintenance", "on"]);
    wait_for_async(LONG, "status says maintenance", || async { ctl.json(&["status"])["maintenance"] == true }).await.expect("maintenance");
    ctl.ok(&["uncordon", "r1"]);
    let dry = ctl.json(&["rebalance", "--dry-run"]);
    assert_eq!(dry["moves"].as_array().map(Vec::len), Some(2), "two slices would move back to r1: {dry}");
    assert!(ctl.ok(&["rebalance", "--dry-run"]).contains("r1"));
    let (code, _, err) = ctl.run(Some("tok"), &["rebalance"]);
    assert_eq!(code, 1);
    assert!(err.contains("FAILED_PRECONDITION") && err.contains("maintenance"), "{err}");
    assert_eq!(holdings(c, "t", "in").await.get("r2").map(Vec::len), Some(4), "nothing moved in maintenance");
    ctl.ok(&["maintenance", "off"]);
    ctl.ok(&["rebalance"]);
    wait_for_async(LONG, "rebalanced", || async {
        let h = holdings(&mut c.clone(), "t", "in").await;
        h.len() == 2 && h.values().all(|v| v.len() == 2)
    })
    .await
    .expect("rebalance");
}

impl Ctl {
    fn json_lines(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        self.ok(&all).lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
    }
}

#[tokio::test]
async fn the_admin_api_over_mutual_tls_needs_the_right_ca_and_a_client_certificate() {
    let spool = Spool::new(&["in"]).expect("spool");
    let pki = qslice_tests::pki::Pki::generate(&spool.scratch("pki"), "qslice-test-ca").expect("certificates");
    let other = qslice_tests::pki::Pki::generate(&spool.scratch("other-pki"), "some-other-ca").expect("certificates");
    let (cert, key, ca) = (pki.path("server.pem"), pki.path("server.key"), pki.path("ca.pem"));
    let tc = TestCluster::builder()
        .spool(spool)
        .coordinators(1)
        .coordinator_args(&["--admin-tls-cert", &cert, "--admin-tls-key", &key, "--admin-client-ca", &ca])
        .start()
        .await
        .expect("cluster");
    let https = tc.coordinator("c1").admin.replace("http://", "https://");
    let ctl = Ctl { coordinator: https };
    let (client_cert, client_key) = (pki.path("client.pem"), pki.path("client.key"));
    wait_for_async(LONG, "queues over mTLS", || async { ctl.run(None, &["--ca", &ca, "--cert", &client_cert, "--key", &client_key, "queues"]).0 == 0 }).await.expect("mTLS works");
    let (code, _, err) = ctl.run(None, &["--ca", &ca, "queues"]);
    assert_eq!(code, 1, "no client certificate is refused: {err}");
    let wrong_ca = other.path("ca.pem");
    let (code, _, err) = ctl.run(None, &["--ca", &wrong_ca, "--cert", &client_cert, "--key", &client_key, "queues"]);
    assert_eq!(code, 1, "a server certificate from another CA is refused: {err}");
    let (their_cert, their_key) = (other.path("client.pem"), other.path("client.key"));
    let (code, _, err) = ctl.run(None, &["--ca", &ca, "--cert", &their_cert, "--key", &their_key, "queues"]);
    assert_eq!(code, 1, "a client certificate from another CA is refused: {err}");
}
