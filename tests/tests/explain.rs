//! `qslicectl explain QUEUE/SLICE` (ExplainSlice), the real binaries on a real etcd: a
//! held slice, a paused queue's slice, a cordoned holder, and a slice whose owner died
//! (nothing holds it, the desired owner is still shown), each named in the output; and
//! bad arguments named with what to do.

use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use qslice_tests::qslice_bin;
use qslice_tests::testcluster::TestCluster;
use qslice_tests::wait::Wait;

const LONG: Duration = Duration::from_secs(60);

/// qslicectl against one coordinator.
struct Ctl {
    coordinator: String,
}

impl Ctl {
    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out =
            Command::new(qslice_bin("qslicectl").expect("built")).args(["--coordinator", &self.coordinator]).args(args).env_remove("QSLICE_TOKEN").output().expect("run qslicectl");
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.run(args);
        assert_eq!(code, 0, "qslicectl {args:?} failed: {err}");
        out
    }

    fn explain(&self, slice: &str) -> (String, serde_json::Value) {
        let text = self.ok(&["explain", slice]);
        let json = self.ok(&["--json", "explain", slice]);
        let json = serde_json::from_str(&json).unwrap_or_else(|e| panic!("explain --json printed no JSON ({e}): {json}"));
        (text, json)
    }

    /// Polls `explain slice --json` until `cond` holds; returns that reply.
    fn explain_until(&self, slice: &str, what: &str, cond: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        Wait::new(LONG, what)
            .poll(|| {
                let (code, out, _) = self.run(&["--json", "explain", slice]);
                let json: Option<serde_json::Value> = if code == 0 { serde_json::from_str(&out).ok() } else { None };
                Ok(json.filter(|j| cond(j)))
            })
            .unwrap_or_else(|e| panic!("{e:#}"))
    }
}

fn line<'a>(text: &'a str, label: &str) -> &'a str {
    text.lines().find(|l| l.starts_with(&format!("{label}:"))).unwrap_or_else(|| panic!("no {label:?} line in:\n{text}"))
}

#[tokio::test]
async fn explain_names_holder_pause_cordon_and_a_dead_owner() {
    // The leader has a long election lease, so that once it is frozen the other stays a standby
    // that answers but plans nothing: a dead owner's slices then stay unheld.
    let mut tc =
        TestCluster::builder().queues(&[("in", 4), ("out", 2)]).coordinators(2).coordinator_args(&["--lease-ttl", "30s"]).runners(&["r1", "r2"]).start().await.expect("cluster");
    // c1 stands for the leader and c2 for the standby, whichever won the election.
    let leader = tc.leader().await.expect("a leader");
    let standby = if leader == "c1" { "c2" } else { "c1" };
    let c1 = Ctl { coordinator: tc.coordinator(&leader).admin.clone() };
    let c2 = Ctl { coordinator: tc.coordinator(standby).admin.clone() };

    // A held slice: holder, epoch, lease and the leader's next step.
    let claims = tc.claims("in").await.expect("claims");
    let (holder, epoch) = claims[&0].clone();
    let (text, json) = c1.explain("in/0");
    assert_eq!(json["claim_holder"], holder.as_str(), "{json}");
    assert_eq!(json["desired_owner"], holder.as_str(), "{json}");
    assert_eq!(json["epoch"], epoch, "{json}");
    assert_eq!(json["holder_lease_granted_seconds"], 2, "the runners' 2 s TTL: {json}");
    assert!(json["claim_age_seconds"].as_f64().is_some(), "{json}");
    assert!(line(&text, "summary").contains(&format!("processing on {holder} (epoch {epoch})")), "{text}");
    assert!(line(&text, "holder").contains(&format!("{holder} (live")), "{text}");
    assert!(line(&text, "lease").contains("left of 2s"), "{text}");
    assert!(line(&text, "next").contains(&format!("it stays on {holder}")), "{text}");
    line(&text, "entries");
    line(&text, "last move");

    // A paused queue's slice: unheld, unassigned, and why.
    c1.ok(&["queue", "pause", "out"]);
    let json = c1.explain_until("out/1", "out/1 released after the pause", |j| j["claim_holder"].is_null() && j["desired_owner"].is_null());
    assert_eq!(json["queue_paused"], true);
    let (text, _) = c1.explain("out/1");
    assert!(line(&text, "summary").contains("idle: the queue is paused"), "{text}");
    assert!(line(&text, "desired owner").contains("none"), "{text}");
    assert!(text.contains("queue out is paused") && text.contains("qslicectl queue resume out"), "{text}");

    // A cordoned holder, in maintenance mode so that it keeps the slice: the cordon is
    // named and so is the move that waits for maintenance to end.
    c1.ok(&["maintenance", "on"]);
    let held_by_r1 = tc.holdings("in").await.get("r1").cloned().unwrap_or_default();
    let s = *held_by_r1.first().expect("r1 holds a slice of in");
    let slice = format!("in/{s}");
    c1.ok(&["cordon", "r1"]);
    let json = c1.explain_until(&slice, "the cordon seen", |j| j["holder_node"]["cordoned"] == true);
    assert_eq!(json["claim_holder"], "r1", "maintenance keeps it on r1: {json}");
    let (text, _) = c1.explain(&slice);
    assert!(line(&text, "holder").contains("r1 (live, cordoned"), "{text}");
    assert!(text.contains("node r1 is cordoned (qslicectl uncordon r1)"), "{text}");
    assert!(line(&text, "maintenance").contains("on"), "{text}");
    assert!(line(&text, "next").contains("once it is off: r1 -> r2 (node-ineligible)"), "{text}");
    // Maintenance off: the drain happens, and both coordinators saw it with its reason.
    c1.ok(&["maintenance", "off"]);
    for ctl in [&c1, &c2] {
        let json = ctl.explain_until(&slice, "the drained slice on r2 with its last move", |j| j["claim_holder"] == "r2" && j["last_move"]["to_node"] == "r2");
        assert_eq!(json["last_move"]["from_node"], "r1", "{json}");
        assert_eq!(json["last_move"]["reason"], "node-ineligible", "{json}");
    }
    let (text, _) = c2.explain(&slice);
    assert!(line(&text, "last move").contains("r1 -> r2 (node-ineligible)"), "{text}");
    c1.ok(&["uncordon", "r1"]);
    tc.wait_holdings(LONG, "in", "r1 holds 2 slices of in again", |h| h.get("r1").is_some_and(|v| v.len() == 2)).await.expect("rebalanced");

    // The owner dies while the leader is frozen: nothing holds its slices, the desired
    // owner is still shown as gone, and the next step is the takeover.
    let dead_slice = tc.holdings("in").await["r1"][0];
    let slice = format!("in/{dead_slice}");
    tc.coordinator(&leader).proc.signal(Signal::SIGSTOP).expect("SIGSTOP the leader");
    tc.stop_runner("r1");
    let json = c2.explain_until(&slice, "r1's lease expired: its slice unheld, still assigned to r1", |j| {
        j["claim_holder"].is_null() && j["desired_owner"] == "r1" && j["desired_node"]["live"] == false
    });
    assert_eq!(json["next_move"]["to_node"], "r2", "{json}");
    assert_eq!(json["next_move"]["reason"], "orphaned", "{json}");
    let (text, _) = c2.explain(&slice);
    assert!(line(&text, "summary").contains("idle: its owner r1 is gone and nothing holds it"), "{text}");
    assert!(line(&text, "desired owner").contains("r1 (not live"), "{text}");
    assert!(line(&text, "holder").starts_with("holder:        none"), "{text}");
    assert!(line(&text, "next").contains("r1 -> r2 (orphaned)"), "{text}");
    assert!(text.contains("node r1 is not live"), "{text}");
    tc.coordinator(&leader).proc.signal(Signal::SIGCONT).expect("SIGCONT the leader");

    // Bad arguments name themselves and what to do.
    let (code, _, err) = c2.run(&["explain", "ghost/0"]);
    assert_eq!(code, 1);
    assert!(err.contains("NOT_FOUND") && err.contains("ghost") && err.contains("qslicectl queues"), "{err}");
    let (code, _, err) = c2.run(&["explain", "in/9"]);
    assert_eq!(code, 1);
    assert!(err.contains("NOT_FOUND") && err.contains("in/9") && err.contains("4 slices") && err.contains("count from 0"), "{err}");
    let (code, _, err) = c2.run(&["explain", "in-3"]);
    assert_eq!(code, 1);
    assert!(err.contains("\"in-3\"") && err.contains("QUEUE/SLICE"), "{err}");
}
