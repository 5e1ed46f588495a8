//! The coordinator's alerts against a real etcd and the real binaries, with the runners'
//! side written straight into etcd (node records on a lease, slice figures) so that each
//! condition is exact: a queue every node refused shows as having no eligible node, with
//! the refusers named, in `qslicectl queues`, `status`, `status --slices`, `/api/status`
//! and the event stream of leader and standby alike, and clears once a node may take it
//! again; a message in flight past `--in-flight-alert-after` is flagged and alerted once.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use etcd_client::{Client, PutOptions};
use qslice_proto::admin::event::Kind;
use qslice_proto::admin::{Event, WatchEventsRequest};
use qslice_proto::keys::Keys;
use qslice_proto::records::{NodeRecord, Record, SliceFigures, SliceStatus, RECORD_VERSION};
use qslice_tests::cluster::{admin_client, put_queue, Coordinator};
use qslice_tests::qslice_bin;
use qslice_tests::testcluster::TestCluster;
use qslice_tests::wait_for_async;
use serde_json::Value;
use uuid::Uuid;

/// Generous: tests run on a loaded two-core machine. The coordinator checks alerts within
/// 250 ms of a change of nodes (every 5 s for the runners' figures); the latencies seen
/// are printed.
const WAIT: Duration = Duration::from_secs(20);
const CLUSTER: &str = "alerts";

/// Milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A runner as etcd sees it: a node record on a lease, rewritten to refuse queues.
struct FakeRunner {
    record: NodeRecord,
}

impl FakeRunner {
    /// Registers `id` (serving every queue) on a lease of its own.
    async fn register(c: &mut Client, id: &str) -> Result<FakeRunner> {
        // Long enough for the whole test: nothing keeps it alive.
        let lease = c.lease_grant(300, None).await?.id();
        let record = NodeRecord {
            v: RECORD_VERSION,
            node_id: id.into(),
            host: format!("{id}.test"),
            pid: 1,
            incarnation: Uuid::new_v4(),
            weight: 1,
            queues: Vec::new(),
            version: "test".into(),
            started_unix_ms: now_ms(),
            metrics_addr: None,
            lease_id: lease,
            refused_queues: Vec::new(),
        };
        let runner = FakeRunner { record };
        runner.publish(c).await?;
        Ok(runner)
    }

    /// Publishes the queues this node refuses, as a runner that gives queues up does.
    async fn refuse(&mut self, c: &mut Client, queues: &[&str]) -> Result<()> {
        self.record.refused_queues = queues.iter().map(|q| q.to_string()).collect();
        self.publish(c).await
    }

    async fn publish(&self, c: &mut Client) -> Result<()> {
        let keys = Keys::new(CLUSTER)?;
        let options = PutOptions::new().with_lease(self.record.lease_id);
        c.put(keys.node(&self.record.node_id), self.record.encode(), Some(options)).await?;
        Ok(())
    }

    /// Publishes slice figures for `queue` (of `slices`), listed now.
    async fn figures(&self, c: &mut Client, queue: &str, slices: u32, figures: Vec<SliceFigures>) -> Result<()> {
        let keys = Keys::new(CLUSTER)?;
        let status = SliceStatus { v: RECORD_VERSION, node_id: self.record.node_id.clone(), queue: queue.into(), slices_total: slices, listed_unix_ms: now_ms(), slices: figures };
        let options = PutOptions::new().with_lease(self.record.lease_id);
        c.put(keys.status(&self.record.node_id, queue), status.encode(), Some(options)).await?;
        Ok(())
    }
}

/// Figures of a slice with `in_flight` entries, the oldest in flight for `age_ms`.
fn in_flight(slice: u32, in_flight: u64, age_ms: u64) -> SliceFigures {
    SliceFigures { slice, depth: 0, in_flight, oldest_age_ms: 0, oldest_in_flight_age_ms: age_ms }
}

/// The real qslicectl against one coordinator.
struct Ctl {
    coordinator: String,
}

impl Ctl {
    fn run(&self, args: &[&str]) -> Option<String> {
        let out = Command::new(qslice_bin("qslicectl").expect("built")).args(["--coordinator", &self.coordinator]).args(args).output().expect("run qslicectl");
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn json(&self, args: &[&str]) -> Option<Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.run(&all)?).ok()
    }

    /// `qslicectl --json queues`: the queue named `name`.
    fn queue(&self, name: &str) -> Option<Value> {
        self.json(&["queues"])?.as_array()?.iter().find(|q| q["name"] == name).cloned()
    }

    /// `qslicectl --json status`: the alerts.
    fn alerts(&self) -> Vec<String> {
        self.json(&["status"]).and_then(|s| s["alerts"].as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())).unwrap_or_default()
    }

    /// `qslicectl --json status --slices`: the rows of `queue`.
    fn slices(&self, queue: &str) -> Vec<Value> {
        self.json(&["status", "--slices"]).and_then(|s| s["slices"].as_array().map(|a| a.iter().filter(|r| r["queue"] == queue).cloned().collect())).unwrap_or_default()
    }
}

/// Every event a coordinator streams, collected in the background.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<Event>>>);

impl Events {
    async fn watch(admin: &str) -> Events {
        let mut api = admin_client(admin).await.expect("the admin API answers");
        let mut stream = api.watch_events(WatchEventsRequest {}).await.expect("watch events").into_inner();
        let events = Events::default();
        let sink = events.clone();
        tokio::spawn(async move {
            while let Ok(Some(e)) = stream.message().await {
                sink.0.lock().expect("events lock").push(e);
            }
        });
        events
    }

    /// Events of `kind` about `queue` (and `slice`, unless `None`).
    fn of(&self, kind: Kind, queue: &str, slice: Option<u32>) -> Vec<Event> {
        let events = self.0.lock().expect("events lock");
        events.iter().filter(|e| e.kind == kind as i32 && e.queue == queue && slice.is_none_or(|s| !e.whole_queue && e.slice == s)).cloned().collect()
    }
}

/// `GET path` over HTTP/1.0: the body of a 200 answer.
fn http_get(addr: &str, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    anyhow::ensure!(reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200"), "{path}: {}", reply.lines().next().unwrap_or_default());
    Ok(reply.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

fn api_status(addr: &str) -> Option<Value> {
    serde_json::from_str(&http_get(addr, "/api/status").ok()?).ok()
}

/// etcd and coordinator c1 (leading) with its dashboard on a free port; `extra` adds flags.
/// The fake runners never claim what they are assigned, so the claim deadline is longer
/// than any test: a stalled claim's alert is not what these tests are about, and on a
/// loaded machine the default deadline would pass while a test sets its condition up.
async fn cluster(extra: &[&str]) -> TestCluster {
    let builder =
        TestCluster::builder().cluster_name(CLUSTER).spool_queues(&["in"]).coordinators(1).coordinator_args(&["--claim-deadline", "10m"]).coordinator_args(extra).dashboards();
    builder.start().await.expect("cluster")
}

/// A coordinator's admin API URL and dashboard address.
fn addresses(coordinator: &Coordinator) -> (String, String) {
    (coordinator.admin.clone(), coordinator.http.clone().expect("a dashboard"))
}

/// Waits until the coordinator behind `ctl` has read `n` nodes.
async fn wait_for_nodes(ctl: &Ctl, n: usize) {
    wait_for_async(WAIT, &format!("{} lists {n} nodes", ctl.coordinator), || async { ctl.json(&["nodes"]).is_some_and(|v| v.as_array().is_some_and(|a| a.len() == n)) })
        .await
        .expect("nodes");
}

/// Waits until the leader has assigned every slice of `queue` to one of `owners`.
async fn wait_for_assignment(ctl: &Ctl, queue: &str, owners: &[&str]) {
    wait_for_async(WAIT, &format!("every slice of {queue} assigned to one of {owners:?}"), || async {
        let rows = ctl.slices(queue);
        !rows.is_empty() && rows.iter().all(|r| r["desired_owner"].as_str().is_some_and(|o| owners.contains(&o)))
    })
    .await
    .expect("assignment");
}

#[tokio::test]
async fn a_queue_every_node_refused_shows_no_eligible_node_naming_the_refusers_on_leader_and_standby() {
    let mut tc = cluster(&[]).await;
    let mut c = tc.client();
    let (admin, http) = addresses(tc.coordinator("c1"));
    let ctl = Ctl { coordinator: admin.clone() };
    let events = Events::watch(&admin).await;
    let mut r1 = FakeRunner::register(&mut c, "r1").await.expect("r1");
    let mut r2 = FakeRunner::register(&mut c, "r2").await.expect("r2");
    put_queue(&mut c, CLUSTER, "in", 4).await.expect("queue");
    wait_for_nodes(&ctl, 2).await;
    wait_for_assignment(&ctl, "in", &["r1", "r2"]).await;
    // The standby starts once a leader leads, so that c1 keeps the lead.
    let (standby_admin, standby_http) = addresses(tc.start_coordinator("c2").expect("standby"));
    let standby_ctl = Ctl { coordinator: standby_admin.clone() };
    let standby_events = Events::watch(&standby_admin).await;
    wait_for_nodes(&standby_ctl, 2).await;
    assert_eq!(ctl.queue("in").expect("queue")["state"], "active", "both nodes may take it");
    assert!(events.of(Kind::Alert, "in", None).is_empty(), "no alert while a node may take the queue");

    // Both runners give the queue up.
    r1.refuse(&mut c, &["in"]).await.expect("refuse");
    r2.refuse(&mut c, &["in"]).await.expect("refuse");
    let refused_at = std::time::Instant::now();
    let state = "no eligible node (refused by r1, r2)";
    for (who, ctl, events) in [("leader", &ctl, &events), ("standby", &standby_ctl, &standby_events)] {
        wait_for_async(WAIT, &format!("the {who} raises an alert event naming r1 and r2"), || async {
            events.of(Kind::Alert, "in", None).iter().any(|e| e.whole_queue && e.message.contains("refused by r1, r2"))
        })
        .await
        .expect("alert event");
        println!("{who}: alert event {:?} after the refusals", refused_at.elapsed());
        let queue = ctl.queue("in").expect("queue");
        assert_eq!(queue["state"], state, "{who}: {queue}");
        assert_eq!(queue["no_eligible_node"], true, "{who}: {queue}");
        assert_eq!(queue["refused_by"], serde_json::json!(["r1", "r2"]), "{who}: {queue}");
        let table = ctl.run(&["queues"]).expect("queues table");
        assert!(table.contains(state), "{who}: qslicectl queues:\n{table}");
        let alerts = ctl.alerts();
        assert!(alerts.iter().any(|a| a == "queue in has no eligible node (refused by r1, r2): 4 of 4 slices have no owner"), "{who}: {alerts:?}");
        let rows = ctl.slices("in");
        assert!(rows.len() == 4 && rows.iter().all(|r| r["no_eligible_node"] == true), "{who}: {rows:?}");
        let table = ctl.run(&["status", "--slices"]).expect("status table");
        assert!(table.contains("alert:       queue in has no eligible node (refused by r1, r2)"), "{who}:\n{table}");
        assert_eq!(table.matches("(no eligible node)").count(), 4, "{who}: each slice's UNOWNED says why:\n{table}");
    }
    for (who, http) in [("leader", &http), ("standby", &standby_http)] {
        let status = api_status(http).unwrap_or_else(|| panic!("{who}: /api/status"));
        let alerts = status["alerts"].as_array().cloned().unwrap_or_default();
        assert!(alerts.iter().any(|a| a.as_str().is_some_and(|a| a.contains("queue in has no eligible node (refused by r1, r2)"))), "{who}: {status}");
        let queue = status["queues"].as_array().and_then(|q| q.iter().find(|q| q["name"] == "in").cloned()).expect("queue in");
        assert_eq!((queue["state"].as_str(), queue["no_eligible_node"].as_bool()), (Some(state), Some(true)), "{who}: {queue}");
    }

    // A change while the condition lasts (another queue nobody may take, refused in the
    // same records) raises that queue's alert, not queue in's again.
    put_queue(&mut c, CLUSTER, "spare", 2).await.expect("queue");
    r1.refuse(&mut c, &["in", "spare"]).await.expect("refuse");
    r2.refuse(&mut c, &["in", "spare"]).await.expect("refuse");
    wait_for_async(WAIT, "an alert for queue spare", || async {
        events.of(Kind::Alert, "spare", None).iter().any(|e| e.message.contains("spare has no eligible node (refused by r1, r2)"))
    })
    .await
    .expect("spare alert");
    let raised = events.of(Kind::Alert, "in", None);
    assert_eq!(raised.len(), 1, "queue in's alert is raised once per episode: {raised:?}");
    assert!(events.of(Kind::AlertCleared, "in", None).is_empty(), "queue in still has no eligible node");
    assert_eq!(standby_events.of(Kind::Alert, "in", None).len(), 1, "the standby raises it once too");
}

#[tokio::test]
async fn the_alert_ends_once_a_refusal_is_lifted_and_the_leader_assigns_the_slices() {
    let tc = cluster(&[]).await;
    let mut c = tc.client();
    let admin = tc.coordinator("c1").admin.clone();
    let ctl = Ctl { coordinator: admin.clone() };
    let events = Events::watch(&admin).await;
    let mut r1 = FakeRunner::register(&mut c, "r1").await.expect("r1");
    let mut r2 = FakeRunner::register(&mut c, "r2").await.expect("r2");
    r1.refuse(&mut c, &["in"]).await.expect("refuse");
    r2.refuse(&mut c, &["in"]).await.expect("refuse");
    wait_for_nodes(&ctl, 2).await;
    // A new queue that nobody may take: never assigned at all.
    put_queue(&mut c, CLUSTER, "in", 4).await.expect("queue");
    wait_for_async(WAIT, "the alert for queue in", || async { !events.of(Kind::Alert, "in", None).is_empty() }).await.expect("alert");
    assert!(ctl.alerts().iter().any(|a| a.starts_with("queue in has no eligible node (refused by r1, r2)")));
    assert!(ctl.slices("in").iter().all(|r| r["desired_owner"].is_null()), "nobody is assigned a slice nobody may take");
    // A queue created after the coordinator started counts as unowned since it was made.
    wait_for_async(WAIT, "every slice of the new queue counts its time unowned", || async {
        let rows = ctl.slices("in");
        rows.len() == 4 && rows.iter().all(|r| r["unowned_seconds"].as_f64().is_some_and(|u| u > 0.0))
    })
    .await
    .expect("unowned seconds");

    // r2 takes the queue again.
    r2.refuse(&mut c, &[]).await.expect("lift");
    let lifted_at = std::time::Instant::now();
    wait_for_async(WAIT, "the alert on queue in is cleared", || async { !events.of(Kind::AlertCleared, "in", None).is_empty() }).await.expect("cleared");
    println!("cleared event {:?} after the refusal was lifted", lifted_at.elapsed());
    let cleared = &events.of(Kind::AlertCleared, "in", None)[0];
    assert!(cleared.whole_queue && cleared.message.contains("queue in has an eligible node again"), "{cleared:?}");
    wait_for_assignment(&ctl, "in", &["r2"]).await;
    let alerts = ctl.alerts();
    assert!(!alerts.iter().any(|a| a.contains("queue in")), "{alerts:?}");
    let queue = ctl.queue("in").expect("queue");
    assert_eq!((queue["state"].as_str(), queue["no_eligible_node"].as_bool()), (Some("active (refused by r1)"), Some(false)), "{queue}");
    assert_eq!(queue["refused_by"], serde_json::json!(["r1"]));
    assert!(ctl.slices("in").iter().all(|r| r["no_eligible_node"] == false));
    assert_eq!(events.of(Kind::Alert, "in", None).len(), 1, "one alert, one clearing");
}

#[tokio::test]
async fn a_message_in_flight_past_the_threshold_is_flagged_and_alerted_once_per_episode() {
    let tc = cluster(&["--in-flight-alert-after", "2s"]).await;
    let mut c = tc.client();
    let (admin, http) = addresses(tc.coordinator("c1"));
    let ctl = Ctl { coordinator: admin.clone() };
    let events = Events::watch(&admin).await;
    let r1 = FakeRunner::register(&mut c, "r1").await.expect("r1");
    put_queue(&mut c, CLUSTER, "in", 4).await.expect("queue");
    wait_for_assignment(&ctl, "in", &["r1"]).await;

    // Slice 2's oldest .bak is 12 minutes old; slice 1's age is unknown (an older runner).
    r1.figures(&mut c, "in", 4, vec![in_flight(1, 1, 0), in_flight(2, 1, 720_000)]).await.expect("figures");
    wait_for_async(WAIT, "GetStatus alerts on in/2's message in flight", || async { ctl.alerts().iter().any(|a| a == "in/2 has a message in flight for 12 min") })
        .await
        .expect("status alert");
    let rows = ctl.slices("in");
    let row = |s: u64| rows.iter().find(|r| r["slice"] == s).cloned().expect("row");
    assert_eq!((row(2)["in_flight"].as_u64(), row(2)["in_flight_too_long"].as_bool()), (Some(1), Some(true)), "{:?}", row(2));
    assert!(row(2)["oldest_in_flight_age_seconds"].as_f64().is_some_and(|a| a >= 720.0), "{:?}", row(2));
    assert_eq!(row(1)["in_flight_too_long"], false, "no age, no flag: {:?}", row(1));
    let table = ctl.run(&["status", "--slices"]).expect("status table");
    let line = table.lines().find(|l| l.starts_with("in ") && l.split_whitespace().nth(1) == Some("2")).expect("in/2 row");
    assert!(table.contains("IN FLIGHT") && line.contains("12m") && line.contains("(too long)"), "{table}");
    let status = api_status(&http).expect("/api/status");
    let cell = status["queues"][0]["cells"][2].clone();
    assert_eq!((cell["slice"].as_u64(), cell["in_flight_too_long"].as_bool()), (Some(2), Some(true)), "{status}");
    assert!(status["alerts"].as_array().is_some_and(|a| a.iter().any(|x| x == "in/2 has a message in flight for 12 min")), "{status}");
    wait_for_async(WAIT, "an alert event for in/2", || async { !events.of(Kind::Alert, "in", Some(2)).is_empty() }).await.expect("event");

    // The runner republishes (the message is still in flight) and slice 3 gets stuck too:
    // slice 3 is alerted, slice 2 not again.
    r1.figures(&mut c, "in", 4, vec![in_flight(2, 1, 725_000), in_flight(3, 2, 3_000)]).await.expect("figures");
    wait_for_async(WAIT, "an alert event for in/3", || async { !events.of(Kind::Alert, "in", Some(3)).is_empty() }).await.expect("event");
    assert_eq!(events.of(Kind::Alert, "in", Some(2)).len(), 1, "in/2 is alerted once per episode");

    // Slice 2's message finishes: its alert is cleared, slice 3's stays.
    r1.figures(&mut c, "in", 4, vec![in_flight(3, 2, 8_000)]).await.expect("figures");
    wait_for_async(WAIT, "in/2's alert cleared", || async { !events.of(Kind::AlertCleared, "in", Some(2)).is_empty() }).await.expect("cleared");
    let alerts = ctl.alerts();
    assert!(!alerts.iter().any(|a| a.starts_with("in/2 ")) && alerts.iter().any(|a| a.starts_with("in/3 has a message in flight")), "{alerts:?}");
    assert!(events.of(Kind::AlertCleared, "in", Some(3)).is_empty());
}
