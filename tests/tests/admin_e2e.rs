//! The admin API over gRPC against a real cluster: every RPC, auth and validation
//! failures, a drain with entries flowing, and a live reslice with entries flowing.

use std::time::Duration;

use qslice_proto::admin::admin_client::AdminClient;
use qslice_proto::admin::event::Kind;
use qslice_proto::admin::*;
use qslice_tests::cluster::{admin_client, holdings};
use qslice_tests::testcluster::TestCluster;
use qslice_tests::wait_for_async;
use tonic::transport::Channel;
use tonic::{Code, Request};

const LONG: Duration = Duration::from_secs(60);
const TOKEN: &str = "s3cret-token";

fn req<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(message);
    if let Some(t) = token {
        r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().expect("ascii"));
    }
    r
}

async fn connect(url: &str) -> AdminClient<Channel> {
    admin_client(url).await.expect("the admin API answers")
}

fn put(name: &str, slices: u32, mailman3: bool) -> PutQueueRequest {
    PutQueueRequest { name: name.into(), slices, mailman3 }
}

fn slice(queue: &str, slice: u32) -> Option<SliceRef> {
    Some(SliceRef { queue: queue.into(), slice })
}

#[tokio::test]
async fn mutations_need_the_token_and_bad_requests_name_the_field() {
    let mut tc = TestCluster::builder().spool_queues(&["in"]).coordinators(1).coordinator_args(&["--admin-token", TOKEN]).start().await.expect("cluster");
    let mut api = connect(&tc.coordinator("c1").admin).await;
    let status = api.put_queue(req(put("in", 4, false), None)).await.expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = api.put_queue(req(put("in", 4, false), Some("wrong"))).await.expect_err("wrong token");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    wait_for_async(LONG, "reads work without a token", || {
        let mut api = api.clone();
        async move { api.list_queues(req(ListQueuesRequest {}, None)).await.is_ok() }
    })
    .await
    .expect("reads");
    api.put_queue(req(put("in", 4, false), Some(TOKEN))).await.expect("with the token");
    // The API answers from its cache of etcd, which sees the new queue through its watch
    // a moment after the write: the checks on slices of "in" below need it there.
    wait_for_async(LONG, "queue in in the API's view", || {
        let mut api = api.clone();
        async move { api.list_queues(req(ListQueuesRequest {}, None)).await.is_ok_and(|r| r.get_ref().queues.iter().any(|q| q.name == "in")) }
    })
    .await
    .expect("queue seen");

    let cases: Vec<(PutQueueRequest, &str)> = vec![
        (put("in", 0, false), "slices"),
        (put("in", 65537, false), "slices"),
        (put("in", 6, true), "slices"),
        (put("", 4, false), "name"),
        (put("..", 4, false), "name"),
        (put("a/b", 4, false), "name"),
    ];
    for (request, field) in cases {
        let name = request.name.clone();
        let status = api.put_queue(req(request, Some(TOKEN))).await.expect_err("invalid");
        assert_eq!(status.code(), Code::InvalidArgument, "{name:?}: {status:?}");
        assert!(status.message().starts_with(field), "{name:?}: message names {field}: {}", status.message());
    }
    api.put_queue(req(put("out", 6, false), Some(TOKEN))).await.expect("6 slices is fine without mailman3");

    let nf = |s: tonic::Status| {
        assert_eq!(s.code(), Code::NotFound, "{s:?}");
        s.message().to_owned()
    };
    nf(api.delete_queue(req(QueueRequest { name: "nosuch".into() }, Some(TOKEN))).await.expect_err("unknown queue"));
    nf(api.pause_queue(req(QueueRequest { name: "nosuch".into() }, Some(TOKEN))).await.expect_err("unknown queue"));
    nf(api.cordon_node(req(NodeRequest { node: "ghost".into() }, Some(TOKEN))).await.expect_err("unknown node"));
    let m = nf(api.pin_slice(req(PinSliceRequest { slice: slice("in", 4), node: "ghost".into() }, Some(TOKEN))).await.expect_err("slice 4 of 4"));
    assert!(m.contains("slice"), "{m}");
    nf(api.move_slice(req(MoveSliceRequest { slice: slice("in", 1), target_node: "ghost".into() }, Some(TOKEN))).await.expect_err("unknown node"));
    nf(api.unpin_slice(req(SliceRef { queue: "in".into(), slice: 0 }, Some(TOKEN))).await.expect_err("no pin"));

    // Protected reads: a second coordinator with --admin-protect-reads.
    let co2 = tc.start_coordinator_with("c2", &["--admin-protect-reads", "true"]).expect("coordinator");
    let mut api2 = connect(&co2.admin).await;
    let status = api2.list_queues(req(ListQueuesRequest {}, None)).await.expect_err("protected read");
    assert_eq!(status.code(), Code::Unauthenticated);
    wait_for_async(LONG, "the standby answers reads with the token", || {
        let mut api2 = api2.clone();
        async move { api2.list_queues(req(ListQueuesRequest {}, Some(TOKEN))).await.is_ok_and(|r| r.get_ref().queues.len() == 2) }
    })
    .await
    .expect("standby reads");
}

#[tokio::test]
async fn every_rpc_works_against_a_live_cluster() {
    let mut tc = TestCluster::builder().spool_queues(&["in"]).coordinators(2).runners(&["r1", "r2"]).start().await.expect("cluster");
    let mut c = tc.client();
    let (admin, standby_admin) = (tc.coordinator("c1").admin.clone(), tc.coordinator("c2").admin.clone());
    let mut api = connect(&admin).await;
    let mut events = connect(&admin).await.watch_events(req(WatchEventsRequest {}, None)).await.expect("events").into_inner();
    wait_for_async(LONG, "the API has read the cluster", || {
        let mut api = api.clone();
        async move { api.list_nodes(req(ListNodesRequest {}, None)).await.is_ok_and(|r| r.get_ref().nodes.len() == 2) }
    })
    .await
    .expect("ready");
    api.put_queue(req(put("in", 4, false), None)).await.expect("put queue");
    wait_for_async(LONG, "2 slices each", || async {
        let h = holdings(&mut c.clone(), "t", "in").await;
        h.len() == 2 && h.values().all(|v| v.len() == 2)
    })
    .await
    .expect("balanced");

    // GetStatus from the standby too: every instance answers reads.
    for api in [&mut api, &mut connect(&standby_admin).await] {
        status_with_every_claim(api).await;
    }
    let queues = api.list_queues(req(ListQueuesRequest {}, None)).await.expect("queues").into_inner().queues;
    assert_eq!(queues.iter().map(|q| q.name.as_str()).collect::<Vec<_>>(), vec!["in"]);

    cordon_pin_and_move(&mut api, &mut c).await;
    maintenance_pause_resume_and_delete(&mut api, &mut c).await;

    // A runner comes and goes.
    tc.start_runner("r3").expect("runner");
    wait_for_async(LONG, "r3 registered", || {
        let mut api = api.clone();
        async move { api.list_nodes(req(ListNodesRequest {}, None)).await.is_ok_and(|r| r.get_ref().nodes.len() == 3) }
    })
    .await
    .expect("r3 joined");
    tc.stop_runner("r3");

    // The event stream saw it all happen.
    let mut kinds = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + LONG;
    let wanted = [Kind::SliceAssigned, Kind::SliceClaimed, Kind::SliceReleased, Kind::NodeJoined, Kind::NodeLeft];
    while !wanted.iter().all(|k| kinds.contains(&(*k as i32))) {
        let next = tokio::time::timeout_at(deadline, events.message()).await.expect("events keep coming").expect("stream ok").expect("not ended");
        kinds.insert(next.kind);
    }

    health_and_reflection(&admin).await;
}

/// GetStatus of one instance, once its view holds both coordinators and the four claims
/// etcd holds: the leader, the standby, both nodes and each slice's holder.
async fn status_with_every_claim(api: &mut AdminClient<Channel>) {
    // Each instance writes its record when it starts campaigning; wait until this one
    // has seen both, and the claims etcd already holds (an instance's view follows etcd
    // through its watch, a moment behind).
    wait_for_async(LONG, "a leader, one standby and every claim in the status", || {
        let mut api = api.clone();
        async move {
            api.get_status(req(GetStatusRequest { include_slices: true }, None)).await.is_ok_and(|s| {
                let s = s.get_ref();
                s.leader.is_some() && s.standbys.len() == 1 && s.slices.len() == 4 && s.slices.iter().all(|x| !x.claim_holder.is_empty() && x.desired_owner == x.claim_holder)
            })
        }
    })
    .await
    .expect("coordinators seen");
    let status = api.get_status(req(GetStatusRequest { include_slices: true }, None)).await.expect("status").into_inner();
    assert_eq!(status.cluster, "t");
    assert!(status.leader.is_some(), "{status:?}");
    assert_eq!(status.standbys.len(), 1);
    assert_eq!(status.nodes.len(), 2);
    assert_eq!(status.queues[0].slices, 4);
    assert_eq!(status.slices.len(), 4);
    assert!(status.slices.iter().all(|s| !s.claim_holder.is_empty() && s.epoch > 0 && s.desired_owner == s.claim_holder), "{:?}", status.slices);
}

/// Cordon moves r1's slices to r2 and uncordon balances them back; a pin, a move and an
/// unpin; a rebalance.
async fn cordon_pin_and_move(api: &mut AdminClient<Channel>, c: &mut etcd_client::Client) {
    let node = api.cordon_node(req(NodeRequest { node: "r1".into() }, None)).await.expect("cordon").into_inner().node.expect("node");
    assert!(node.cordoned);
    wait_for_async(LONG, "r2 holds all 4", || async { holdings(&mut c.clone(), "t", "in").await.get("r2").is_some_and(|v| v.len() == 4) }).await.expect("cordon moved");
    let dry = api.rebalance(req(RebalanceRequest { dry_run: true }, None)).await.expect("dry run").into_inner();
    assert!(!dry.applied && dry.moves.is_empty(), "balanced while r1 is cordoned: {dry:?}");
    api.uncordon_node(req(NodeRequest { node: "r1".into() }, None)).await.expect("uncordon");
    wait_for_async(LONG, "2 slices each again", || async {
        let h = holdings(&mut c.clone(), "t", "in").await;
        h.len() == 2 && h.values().all(|v| v.len() == 2)
    })
    .await
    .expect("balanced again");

    // Pin slice 0 on its holder's peer, then move another slice; unpin.
    let h = holdings(c, "t", "in").await;
    let (holder_of_0, other) = if h["r1"].contains(&0) { ("r1", "r2") } else { ("r2", "r1") };
    api.pin_slice(req(PinSliceRequest { slice: slice("in", 0), node: other.into() }, None)).await.expect("pin");
    wait_for_async(LONG, "slice 0 on its pin node", || async { holdings(&mut c.clone(), "t", "in").await.get(other).is_some_and(|v| v.contains(&0)) }).await.expect("pinned");
    let moved_slice = holdings(c, "t", "in").await[other].iter().copied().find(|s| *s != 0).expect("another slice");
    let mv = api.move_slice(req(MoveSliceRequest { slice: slice("in", moved_slice), target_node: holder_of_0.into() }, None)).await.expect("move").into_inner();
    assert_eq!((mv.from_node.as_str(), mv.to_node.as_str()), (other, holder_of_0));
    wait_for_async(LONG, "the moved slice on its target", || async { holdings(&mut c.clone(), "t", "in").await.get(holder_of_0).is_some_and(|v| v.contains(&moved_slice)) })
        .await
        .expect("moved");
    let unpinned = api.unpin_slice(req(SliceRef { queue: "in".into(), slice: 0 }, None)).await.expect("unpin").into_inner();
    assert_eq!(unpinned.node, other);
    let applied = api.rebalance(req(RebalanceRequest { dry_run: false }, None)).await.expect("rebalance").into_inner();
    assert!(applied.applied);
}

/// Maintenance shows in the status; pause releases every slice, resume brings them back,
/// delete releases them for good.
async fn maintenance_pause_resume_and_delete(api: &mut AdminClient<Channel>, c: &mut etcd_client::Client) {
    api.set_maintenance(req(SetMaintenanceRequest { on: true }, None)).await.expect("maintenance on");
    wait_for_async(LONG, "status shows maintenance", || {
        let mut api = api.clone();
        async move { api.get_status(req(GetStatusRequest::default(), None)).await.is_ok_and(|s| s.get_ref().maintenance) }
    })
    .await
    .expect("maintenance");
    api.set_maintenance(req(SetMaintenanceRequest { on: false }, None)).await.expect("maintenance off");

    let paused = api.pause_queue(req(QueueRequest { name: "in".into() }, None)).await.expect("pause").into_inner().queue.expect("queue");
    assert!(paused.paused);
    wait_for_async(LONG, "no claims while paused", || async { holdings(&mut c.clone(), "t", "in").await.is_empty() }).await.expect("released");
    api.resume_queue(req(QueueRequest { name: "in".into() }, None)).await.expect("resume");
    wait_for_async(LONG, "claims back after resume", || async { total(&holdings(&mut c.clone(), "t", "in").await) == 4 }).await.expect("resumed");
    api.delete_queue(req(QueueRequest { name: "in".into() }, None)).await.expect("delete");
    wait_for_async(LONG, "no claims after delete", || async { holdings(&mut c.clone(), "t", "in").await.is_empty() }).await.expect("deleted");
}

/// The health service says the admin service serves, and reflection lists it.
async fn health_and_reflection(admin: &str) {
    let channel = Channel::from_shared(admin.to_owned()).expect("url").connect().await.expect("channel");
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest { service: "qslice.admin.v1.Admin".into() })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(health.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest, server_reflection_response::MessageResponse, ServerReflectionRequest,
    };
    let ask = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let channel = Channel::from_shared(admin.to_owned()).expect("url").connect().await.expect("channel");
    let mut replies = ServerReflectionClient::new(channel).server_reflection_info(tokio_stream::iter([ask])).await.expect("reflection").into_inner();
    let reply = replies.message().await.expect("reply").expect("one reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else { panic!("unexpected reply {reply:?}") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"qslice.admin.v1.Admin".to_owned()), "reflection lists the admin service: {names:?}");
}

fn total(h: &std::collections::BTreeMap<String, Vec<u32>>) -> usize {
    h.values().map(Vec::len).sum()
}

/// etcd, one coordinator and runners r1 and r2 (handlers taking 50 ms an entry), with the
/// admin API ready; everything stops when it is dropped.
struct TwoRunners {
    tc: TestCluster,
    api: AdminClient<Channel>,
}

impl TwoRunners {
    async fn start() -> TwoRunners {
        let tc = TestCluster::builder().spool_queues(&["in"]).coordinators(1).runner_env(&[("QSLICE_TEST_DELAY", "0.05")]).runners(&["r1", "r2"]).start().await.expect("cluster");
        let api = connect(&tc.coordinator("c1").admin).await;
        wait_for_async(LONG, "the API has read the cluster", || {
            let mut api = api.clone();
            async move { api.list_nodes(req(ListNodesRequest {}, None)).await.is_ok_and(|r| r.get_ref().nodes.len() == 2) }
        })
        .await
        .expect("ready");
        TwoRunners { tc, api }
    }
}

#[tokio::test]
async fn a_drain_with_entries_flowing_loses_nothing() {
    let cluster = TwoRunners::start().await;
    let (spool, mut c, mut api) = (cluster.tc.spool(), cluster.tc.client(), cluster.api.clone());
    api.put_queue(req(put("in", 8, false), None)).await.expect("queue");
    wait_for_async(LONG, "8 claims", || async { total(&holdings(&mut c.clone(), "t", "in").await) == 8 }).await.expect("claimed");
    let q = spool.queue("in");
    let writer = tokio::task::spawn_blocking(move || {
        for i in 0..80u32 {
            q.enqueue(format!("m{i}").as_bytes()).expect("enqueue");
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let mut progress = api.drain_node(req(DrainNodeRequest { node: "r1".into(), timeout_seconds: 60 }, None)).await.expect("drain").into_inner();
    let mut last = None;
    while let Some(p) = progress.message().await.expect("progress") {
        last = Some(p);
    }
    let last = last.expect("at least one report");
    assert!(last.done && last.slices_remaining == 0, "{last:?}");
    writer.await.expect("writer");
    wait_for_async(LONG, "all 80 entries finished", || async { spool.finished().len() == 80 }).await.expect("drained");
    assert!(spool.finished().values().all(|n| *n == 1), "none twice");
    assert_eq!(holdings(&mut c, "t", "in").await.get("r2").map(Vec::len), Some(8));
}

#[tokio::test]
async fn a_live_reslice_never_processes_under_both_slicings_at_once() {
    let cluster = TwoRunners::start().await;
    let (spool, mut c, mut api) = (cluster.tc.spool(), cluster.tc.client(), cluster.api.clone());
    api.put_queue(req(put("in", 4, true), None)).await.expect("queue");
    wait_for_async(LONG, "4 claims", || async { total(&holdings(&mut c.clone(), "t", "in").await) == 4 }).await.expect("claimed");
    let q = spool.queue("in");
    let writer = tokio::task::spawn_blocking(move || {
        for i in 0..100u32 {
            q.enqueue(format!("m{i}").as_bytes()).expect("enqueue");
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    wait_for_async(LONG, "entries flowing under 4 slices", || async { spool.records().iter().any(|r| r.slices == 4) }).await.expect("flowing");
    api.put_queue(req(put("in", 8, true), None)).await.expect("reslice to 8");
    writer.await.expect("writer");
    wait_for_async(LONG, "all 100 entries finished", || async { spool.finished().len() == 100 }).await.expect("drained");
    let records = spool.records();
    assert!(spool.finished().values().all(|n| *n == 1), "none twice");
    let old_end = records.iter().filter(|r| r.slices == 4 && r.what == "end").map(|r| r.at_ns).max().expect("some under 4");
    let new_start = records.iter().filter(|r| r.slices == 8 && r.what == "start").map(|r| r.at_ns).min().expect("some under 8");
    assert!(new_start > old_end, "an entry started under 8 slices before the last one under 4 ended");
    let claims = qslice_tests::cluster::claims(&mut c, "t", "in").await.expect("claims");
    assert_eq!(claims.len(), 8);
}
