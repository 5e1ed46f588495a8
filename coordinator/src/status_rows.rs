//! The status of a cluster as rows: what qslicectl prints (`status`, `nodes`, `queues`,
//! as tables or `--json`) and what the dashboard's `/api/status` draws, both built here
//! from the admin API's status messages, so the two cannot tell a different story.
//!
//! Contract: pure. A row field is the message field, with the admin API's "empty string
//! means none" turned into `None`; a queue state missing from an older coordinator's reply
//! is worked out from the fields it did send. The rows are serde types: their JSON is
//! qslicectl's `--json` output.

use qslice_proto::admin::{CoordinatorInfo, GetStatusResponse, NodeInfo, QueueInfo, SingletonInfo, SliceInfo};
use serde::Serialize;

/// A coordinator instance.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CoordinatorRow {
    /// Its id.
    pub id: String,
    /// Where it serves the admin API.
    pub admin_address: String,
}

/// A runner node.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeRow {
    /// Node id.
    pub id: String,
    /// Host name.
    pub host: String,
    /// Relative share of slices.
    pub weight: u32,
    /// Queues it serves; empty means every queue.
    pub queues: Vec<String>,
    /// Whether it takes no new slices.
    pub cordoned: bool,
    /// The runner process's incarnation.
    pub incarnation: String,
    /// Seconds since it joined.
    pub age_seconds: u64,
    /// Slices it holds claims on.
    pub slices_held: u32,
    /// qslice version of the runner.
    pub version: String,
    /// Where its metrics are served, if anywhere.
    pub metrics_address: Option<String>,
}

/// A queue.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QueueRow {
    /// Queue name.
    pub name: String,
    /// Slice count.
    pub slices: u32,
    /// Whether no runner processes it.
    pub paused: bool,
    /// Whether it is a Mailman 3 queue.
    pub mailman3: bool,
    /// Claims still held under another slice count (a reslice in progress).
    pub old_slicing_claims: u32,
    /// Whether the queue is active and no live node may take its slices.
    pub no_eligible_node: bool,
    /// Live nodes that gave the queue up.
    pub refused_by: Vec<String>,
    /// The state in words, e.g. `active`, `no eligible node (refused by r1, r2)`.
    pub state: String,
}

/// Ownership and figures of one slice.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SliceRow {
    /// Queue name.
    pub queue: String,
    /// Slice number.
    pub slice: u32,
    /// Node the coordinator assigned it to.
    pub desired_owner: Option<String>,
    /// Node that holds the claim now.
    pub claim_holder: Option<String>,
    /// Create revision of the claim key.
    pub epoch: i64,
    /// Entries waiting.
    pub depth: u64,
    /// Age of the oldest entry, seconds.
    pub oldest_entry_age_seconds: f64,
    /// Seconds without a claim holder; 0 while it has one.
    pub unowned_seconds: f64,
    /// Whether the assignment is pinned.
    pub pinned: bool,
    /// Entries in flight (`.bak`).
    pub in_flight: u64,
    /// Age of the oldest entry in flight, seconds (0 when none).
    pub oldest_in_flight_age_seconds: f64,
    /// Whether that is longer than the coordinator's `in_flight_alert_after`.
    pub in_flight_too_long: bool,
    /// Whether no live node may take the slice's queue.
    pub no_eligible_node: bool,
    /// The node whose revoked lease the slice is held back after, if it is.
    pub held_after_revoke_of: Option<String>,
}

/// The `status` reply.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StatusView {
    /// Cluster name.
    pub cluster: String,
    /// The leading coordinator, if one leads.
    pub leader: Option<CoordinatorRow>,
    /// Coordinators standing by.
    pub standbys: Vec<CoordinatorRow>,
    /// Whether maintenance mode is on.
    pub maintenance: bool,
    /// Active alerts.
    pub alerts: Vec<String>,
    /// Runner nodes.
    pub nodes: Vec<NodeRow>,
    /// Queues.
    pub queues: Vec<QueueRow>,
    /// Per-slice rows; absent unless asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slices: Option<Vec<SliceRow>>,
    /// Cluster-wide singleton commands, by name.
    pub singletons: Vec<SingletonRow>,
}

/// A cluster-wide singleton command.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SingletonRow {
    /// Its name (the `[singleton.<name>]` table of the runners).
    pub name: String,
    /// The node that holds its claim and runs it; none when no runner does.
    pub holder: Option<String>,
    /// The holder's incarnation.
    pub incarnation: Option<String>,
    /// Seconds since the holder claimed it.
    pub held_seconds: u64,
    /// The claim's epoch (create revision); 0 when not held.
    pub epoch: i64,
    /// A periodic singleton's last settled slot, seconds since the Unix epoch.
    pub last_slot_unix_seconds: Option<i64>,
    /// How that slot ended.
    pub last_outcome: Option<String>,
}

/// A singleton as a row.
pub fn singleton_row(s: &SingletonInfo) -> SingletonRow {
    SingletonRow {
        name: s.name.clone(),
        holder: non_empty(&s.holder),
        incarnation: non_empty(&s.incarnation),
        held_seconds: s.held_seconds,
        epoch: s.epoch,
        last_slot_unix_seconds: (s.last_slot_unix_seconds != 0).then_some(s.last_slot_unix_seconds),
        last_outcome: non_empty(&s.last_outcome),
    }
}

/// A coordinator as a row.
pub fn coordinator_row(c: &CoordinatorInfo) -> CoordinatorRow {
    CoordinatorRow { id: c.id.clone(), admin_address: c.admin_address.clone() }
}

/// A node as a row.
pub fn node_row(n: &NodeInfo) -> NodeRow {
    NodeRow {
        id: n.id.clone(),
        host: n.host.clone(),
        weight: n.weight,
        queues: n.queues.clone(),
        cordoned: n.cordoned,
        incarnation: n.incarnation.clone(),
        age_seconds: n.age_seconds,
        slices_held: n.slices_held,
        version: n.version.clone(),
        metrics_address: non_empty(&n.metrics_address),
    }
}

/// Nodes as rows.
pub fn node_rows(nodes: &[NodeInfo]) -> Vec<NodeRow> {
    nodes.iter().map(node_row).collect()
}

/// A queue as a row.
pub fn queue_row(q: &QueueInfo) -> QueueRow {
    QueueRow {
        name: q.name.clone(),
        slices: q.slices,
        paused: q.paused,
        mailman3: q.mailman3,
        old_slicing_claims: q.old_slicing_claims,
        no_eligible_node: q.no_eligible_node,
        refused_by: q.refused_by.clone(),
        state: if q.state.is_empty() { legacy_state(q.paused, q.old_slicing_claims) } else { q.state.clone() },
    }
}

/// The state of a queue from a coordinator too old to send it.
fn legacy_state(paused: bool, old_slicing_claims: u32) -> String {
    match (paused, old_slicing_claims) {
        (true, _) => "paused".to_owned(),
        (false, 0) => "active".to_owned(),
        (false, n) => format!("reslicing ({n} old claims)"),
    }
}

/// Queues as rows.
pub fn queue_rows(queues: &[QueueInfo]) -> Vec<QueueRow> {
    queues.iter().map(queue_row).collect()
}

/// A slice as a row.
pub fn slice_row(s: &SliceInfo) -> SliceRow {
    SliceRow {
        queue: s.queue.clone(),
        slice: s.slice,
        desired_owner: non_empty(&s.desired_owner),
        claim_holder: non_empty(&s.claim_holder),
        epoch: s.epoch,
        depth: s.depth,
        oldest_entry_age_seconds: s.oldest_entry_age_seconds,
        unowned_seconds: s.unowned_seconds,
        pinned: s.pinned,
        in_flight: s.in_flight,
        oldest_in_flight_age_seconds: s.oldest_in_flight_age_seconds,
        in_flight_too_long: s.in_flight_too_long,
        no_eligible_node: s.no_eligible_node,
        held_after_revoke_of: non_empty(&s.held_after_revoke_of),
    }
}

/// The status reply as a view; `slices` is kept only when it was asked for.
pub fn status_view(r: &GetStatusResponse, include_slices: bool) -> StatusView {
    StatusView {
        cluster: r.cluster.clone(),
        leader: r.leader.as_ref().map(coordinator_row),
        standbys: r.standbys.iter().map(coordinator_row).collect(),
        maintenance: r.maintenance,
        alerts: r.alerts.clone(),
        nodes: node_rows(&r.nodes),
        queues: queue_rows(&r.queues),
        slices: include_slices.then(|| r.slices.iter().map(slice_row).collect()),
        singletons: r.singletons.iter().map(singleton_row).collect(),
    }
}

/// A message string as an option: the admin API sends "" for none.
pub(crate) fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// Admin API replies the tests of qslicectl's rows and tables share.
#[cfg(test)]
pub(crate) mod fixtures {
    use qslice_proto::admin::{CoordinatorInfo, GetStatusResponse, NodeInfo, QueueInfo, SingletonInfo, SliceInfo};

    pub(crate) fn node(id: &str, cordoned: bool, queues: &[&str]) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            host: format!("{id}.example"),
            weight: 1,
            queues: queues.iter().map(|q| q.to_string()).collect(),
            cordoned,
            incarnation: "inc-1".into(),
            age_seconds: 185,
            slices_held: 4,
            version: "0.1.0".into(),
            metrics_address: String::new(),
        }
    }

    pub(crate) fn status_reply() -> GetStatusResponse {
        GetStatusResponse {
            cluster: "prod".into(),
            leader: Some(CoordinatorInfo { id: "coord-a".into(), admin_address: "http://a:7700".into() }),
            standbys: vec![CoordinatorInfo { id: "coord-b".into(), admin_address: "http://b:7700".into() }],
            nodes: vec![node("n1", false, &[]), node("node-two", true, &["in", "out"])],
            queues: vec![
                // A coordinator too old to send the state: the client works it out.
                QueueInfo { name: "in".into(), slices: 4, paused: false, mailman3: false, old_slicing_claims: 0, ..QueueInfo::default() },
                QueueInfo { name: "out".into(), slices: 8, paused: true, mailman3: true, state: "paused".into(), ..QueueInfo::default() },
                QueueInfo {
                    name: "bounces".into(),
                    slices: 1,
                    no_eligible_node: true,
                    refused_by: vec!["n1".into()],
                    state: "no eligible node (refused by n1; cordoned: node-two)".into(),
                    ..QueueInfo::default()
                },
            ],
            slices: vec![
                SliceInfo {
                    queue: "in".into(),
                    slice: 0,
                    desired_owner: "n1".into(),
                    claim_holder: "n1".into(),
                    epoch: 42,
                    depth: 3,
                    oldest_entry_age_seconds: 185.0,
                    unowned_seconds: 0.0,
                    pinned: true,
                    in_flight: 1,
                    oldest_in_flight_age_seconds: 725.0,
                    in_flight_too_long: true,
                    no_eligible_node: false,
                    held_after_revoke_of: String::new(),
                },
                SliceInfo {
                    queue: "in".into(),
                    slice: 1,
                    desired_owner: "n1".into(),
                    claim_holder: String::new(),
                    epoch: 0,
                    depth: 0,
                    oldest_entry_age_seconds: 0.0,
                    unowned_seconds: 12.0,
                    pinned: false,
                    in_flight: 2,
                    oldest_in_flight_age_seconds: 4.0,
                    held_after_revoke_of: "node-two".into(),
                    ..SliceInfo::default()
                },
                SliceInfo { queue: "bounces".into(), slice: 0, desired_owner: String::new(), unowned_seconds: 30.0, no_eligible_node: true, ..SliceInfo::default() },
            ],
            maintenance: true,
            alerts: vec!["slice in/1 unowned for 12s".into()],
            singletons: vec![
                SingletonInfo {
                    name: "digests".into(),
                    holder: "n1".into(),
                    incarnation: "inc-1".into(),
                    held_seconds: 3725,
                    epoch: 57,
                    last_slot_unix_seconds: 1_796_083_200,
                    last_outcome: "ok".into(),
                },
                SingletonInfo { name: "notify".into(), ..SingletonInfo::default() },
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::status_reply;
    use super::*;

    #[test]
    fn status_json_has_rows_and_omits_slices_unless_asked() {
        let json = serde_json::to_value(status_view(&status_reply(), false)).expect("serializes");
        assert_eq!(json["leader"]["id"], "coord-a");
        assert_eq!(json["nodes"][1]["cordoned"], true);
        assert_eq!(json["nodes"][0]["metrics_address"], serde_json::Value::Null);
        assert_eq!(json["queues"][1]["mailman3"], true);
        assert!(json.get("slices").is_none());
        let json = serde_json::to_value(status_view(&status_reply(), true)).expect("serializes");
        assert_eq!(json["slices"][0]["epoch"], 42);
        assert_eq!(json["slices"][1]["claim_holder"], serde_json::Value::Null);
        assert_eq!(json["slices"][1]["unowned_seconds"], 12.0);
        assert_eq!(json["slices"][0]["in_flight_too_long"], true);
        assert_eq!(json["slices"][0]["oldest_in_flight_age_seconds"], 725.0);
        assert_eq!(json["queues"][0]["state"], "active");
        assert_eq!(json["queues"][2]["no_eligible_node"], true);
        assert_eq!(json["queues"][2]["refused_by"], serde_json::json!(["n1"]));
    }
}
