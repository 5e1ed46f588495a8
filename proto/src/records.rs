//! The records qslice keeps in etcd, as versioned JSON (readable with `etcdctl get`).
//!
//! Every record carries `"v": 1`. Readers accept unknown fields (a newer writer may add
//! some) but refuse another version or a malformed value with a [`RecordError`] that names
//! the record kind, so a garbage value in etcd is reported, never a crash.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The record format version this build reads and writes.
pub const RECORD_VERSION: u32 = 1;

/// A value read from etcd that is not a record this build understands.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Not JSON, or JSON of the wrong shape.
    #[error("{kind} record is malformed: {source}")]
    Malformed {
        /// The record kind, e.g. "node".
        kind: &'static str,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },
    /// A record version this build does not know.
    #[error("{kind} record has version {found}, this build reads version {RECORD_VERSION}")]
    UnsupportedVersion {
        /// The record kind.
        kind: &'static str,
        /// The version found in the value.
        found: u64,
    },
}

/// A record stored as one etcd value.
pub trait Record: Serialize + DeserializeOwned {
    /// The kind's name in errors and logs.
    const KIND: &'static str;

    /// The JSON bytes to store.
    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("records always serialize")
    }

    /// Decodes a stored value, checking its version.
    fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        #[derive(Deserialize)]
        struct Version {
            v: Option<u64>,
        }
        let kind = Self::KIND;
        let version: Version = serde_json::from_slice(bytes).map_err(|source| RecordError::Malformed { kind, source })?;
        let found = version.v.unwrap_or(0);
        if found != u64::from(RECORD_VERSION) {
            return Err(RecordError::UnsupportedVersion { kind, found });
        }
        serde_json::from_slice(bytes).map_err(|source| RecordError::Malformed { kind, source })
    }
}

fn version() -> u32 {
    RECORD_VERSION
}

/// A live runner: `nodes/<node>`, attached to the runner's lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Record version.
    #[serde(default = "version")]
    pub v: u32,
    /// The node id (unique in the cluster; default the host name).
    pub node_id: String,
    /// The host the runner runs on.
    pub host: String,
    /// The runner's process id.
    pub pid: u32,
    /// Changes every time the runner (re-)registers; tells incarnations apart.
    pub incarnation: Uuid,
    /// Relative share of slices this node should get.
    pub weight: u32,
    /// Queues this node may serve; empty means all.
    #[serde(default)]
    pub queues: Vec<String>,
    /// The qslice version the runner runs.
    pub version: String,
    /// When this incarnation started, in milliseconds since the Unix epoch.
    pub started_unix_ms: i64,
    /// Where the runner serves Prometheus metrics, if anywhere.
    #[serde(default)]
    pub metrics_addr: Option<String>,
    /// The etcd lease the record (and the node's claims) are attached to.
    pub lease_id: i64,
    /// Queues this node gave up for a while (its supervised runners kept crashing); the
    /// coordinator moves their slices to other nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused_queues: Vec<String>,
}

impl Record for NodeRecord {
    const KIND: &'static str = "node";
}

impl NodeRecord {
    /// Whether this node may serve `queue`.
    pub fn serves(&self, queue: &str) -> bool {
        self.queues.is_empty() || self.queues.iter().any(|q| q == queue)
    }
}

/// A queue's configuration: `queues/<queue>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    /// Record version.
    #[serde(default = "version")]
    pub v: u32,
    /// The queue's directory name under the spool root.
    pub name: String,
    /// How many slices the hash space is cut into.
    pub slices: u32,
    /// A paused queue keeps its files but no slice of it is assigned.
    #[serde(default)]
    pub paused: bool,
    /// Mailman 3 takes the slice count from mailman.cfg and needs a power of two.
    #[serde(default)]
    pub mailman3: bool,
}

impl Record for QueueConfig {
    const KIND: &'static str = "queue";
}

/// The slices of one queue assigned to one node: `assign/<node>/<queue>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// Record version.
    #[serde(default = "version")]
    pub v: u32,
    /// The queue.
    pub queue: String,
    /// The slice count the numbers below refer to.
    pub slices_total: u32,
    /// The assigned slices.
    pub slices: SliceSet,
}

impl Record for Assignment {
    const KIND: &'static str = "assignment";
}

/// A runner's claim on one slice: `claims/<queue>/<slice>`, attached to its lease.
/// The key's create revision is the slice's epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// Record version.
    #[serde(default = "version")]
    pub v: u32,
    /// The claiming node.
    pub node_id: String,
    /// The claiming incarnation of that node.
    pub incarnation: Uuid,
    /// The slice count the claim was made under.
    pub slices_total: u32,
    /// When the claim was made, in milliseconds since the Unix epoch.
    pub claimed_unix_ms: i64,
}

impl Record for Claim {
    const KIND: &'static str = "claim";
}

/// A runner's claim on a cluster-wide singleton command: `singletons/<name>`, attached to
/// its lease. Only the holder runs the command; the key's create revision is its epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SingletonClaim {
    /// Record version.
    #[serde(default = "version")]
    pub v: u32,
    /// The claiming node.
    pub node_id: String,
    /// The claiming incarnation of that node.
    pub incarnation: Uuid,
    /// When the claim was made, in milliseconds since the Unix epoch.
    pub claimed_unix_ms: i64,
}

impl Record for SingletonClaim {
    const KIND: &'static str = "singleton claim";
}

/// What the leader keeps back after it revoked a runner's lease: `holds/<queue>/<slice>`
/// for each slice the lease held, `singleton-holds/<name>` for each singleton, attached to
/// a lease of the leader's whose TTL is the revoked lease's. Nobody claims a held slice or
/// singleton: etcd deletes the revoked lease's claims at once, but the runner that held
/// it may still believe its fence valid until its own deadline (up to the TTL from its
/// last keepalive), so the hold lasts until that deadline has surely passed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// Record version.
    #[serde(default = "version")]
    pub v: u32,
    /// The node whose lease was revoked.
    pub node_id: String,
    /// The revoked lease.
    pub lease: i64,
    /// Why the lease was revoked.
    #[serde(default)]
    pub reason: String,
    /// When the hold was written, in milliseconds since the Unix epoch.
    pub since_unix_ms: i64,
}

impl Record for Hold {
    const KIND: &'static str = "hold";
}

/// The last settled slot of a periodic singleton: `singleton-runs/<name>`, on no lease,
/// written by the holder only while its claim is the current one. A slot up to and
/// including `last_slot_unix_ms` is never run again by a later holder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SingletonRun {
    /// Record version.
    #[serde(default = "version")]
    pub v: u32,
    /// The scheduled time of the last settled slot, in milliseconds since the Unix epoch.
    pub last_slot_unix_ms: i64,
    /// The node that settled it.
    pub node_id: String,
    /// When it was settled, in milliseconds since the Unix epoch.
    pub settled_unix_ms: i64,
    /// How: `ok`, `failed`, `timeout` (the run ended), `skipped` (missed beyond the
    /// catch-up), or `baseline` (the schedule's start: slots before it never ran).
    pub outcome: String,
}

impl Record for SingletonRun {
    const KIND: &'static str = "singleton run";
}

/// Figures of one slice, as the runner that listed its queue saw them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceFigures {
    /// The slice number.
    pub slice: u32,
    /// `.pck` entries waiting.
    pub depth: u64,
    /// `.bak` entries being processed (or left by a crash).
    pub in_flight: u64,
    /// Age of the oldest waiting entry in milliseconds, 0 when empty.
    pub oldest_age_ms: u64,
    /// Age of the oldest `.bak` entry in milliseconds (how long it has been in flight,
    /// by its modification time), 0 when there is none. Absent in older records.
    #[serde(default)]
    pub oldest_in_flight_age_ms: u64,
}

/// Per-slice figures a node publishes for one queue: `status/<node>/<queue>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceStatus {
    /// Record version.
    #[serde(default = "version")]
    pub v: u32,
    /// The reporting node.
    pub node_id: String,
    /// The queue.
    pub queue: String,
    /// The slice count the figures refer to.
    pub slices_total: u32,
    /// When the listing was taken, in milliseconds since the Unix epoch.
    pub listed_unix_ms: i64,
    /// Figures of the slices this report covers (only non-empty ones need be listed).
    pub slices: Vec<SliceFigures>,
}

impl Record for SliceStatus {
    const KIND: &'static str = "status";
}

/// An operator's cordon of a node: `cordons/<node>`. A cordoned node gets no new slices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cordon {
    /// Record version.
    #[serde(default = "version")]
    pub v: u32,
    /// Why, as the operator said.
    #[serde(default)]
    pub reason: String,
    /// Since when, in milliseconds since the Unix epoch.
    pub since_unix_ms: i64,
}

impl Record for Cordon {
    const KIND: &'static str = "cordon";
}

/// A slice pinned to a node: `pins/<queue>/<slice>`. The planner never moves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// Record version.
    #[serde(default = "version")]
    pub v: u32,
    /// The node the slice stays on.
    pub node_id: String,
}

impl Record for Pin {
    const KIND: &'static str = "pin";
}

/// The maintenance switch: `control/maintenance`. While on, only orphans move.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Maintenance {
    /// Record version.
    #[serde(default = "version")]
    pub v: u32,
    /// Whether maintenance mode is on.
    pub on: bool,
    /// Since when, in milliseconds since the Unix epoch.
    pub since_unix_ms: i64,
}

impl Record for Maintenance {
    const KIND: &'static str = "maintenance";
}

/// A one-shot request to rebalance now, ignoring the churn budget for one round:
/// `control/rebalance`. The leader deletes it once applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebalanceRequest {
    /// Record version.
    #[serde(default = "version")]
    pub v: u32,
    /// When it was asked, in milliseconds since the Unix epoch.
    pub requested_unix_ms: i64,
}

impl Record for RebalanceRequest {
    const KIND: &'static str = "rebalance";
}

/// A request to move one slice to a node: `moves/<queue>/<slice>`. The leader assigns the
/// slice there (planned hand-off) and deletes the request once the target holds the claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRequest {
    /// Record version.
    #[serde(default = "version")]
    pub v: u32,
    /// The target node.
    pub node_id: String,
    /// When it was asked, in milliseconds since the Unix epoch.
    pub requested_unix_ms: i64,
}

impl Record for MoveRequest {
    const KIND: &'static str = "move";
}

/// A live coordinator instance: `coordinators/<id>`, attached to its lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorRecord {
    /// Record version.
    #[serde(default = "version")]
    pub v: u32,
    /// The instance's id.
    pub id: String,
    /// Where it serves the admin API.
    #[serde(default)]
    pub admin_addr: Option<String>,
    /// Where it serves metrics and health.
    #[serde(default)]
    pub http_addr: Option<String>,
}

impl Record for CoordinatorRecord {
    const KIND: &'static str = "coordinator";
}

/// A set of slice numbers, stored compactly as ranges: `"0-3,7,9-12"`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SliceSet(BTreeSet<u32>);

impl SliceSet {
    /// The empty set.
    pub fn new() -> SliceSet {
        SliceSet::default()
    }
    /// Adds a slice; true when it was not there yet.
    pub fn insert(&mut self, slice: u32) -> bool {
        self.0.insert(slice)
    }
    /// Removes a slice; true when it was there.
    pub fn remove(&mut self, slice: u32) -> bool {
        self.0.remove(&slice)
    }
    /// Whether the slice is in the set.
    pub fn contains(&self, slice: u32) -> bool {
        self.0.contains(&slice)
    }
    /// Number of slices.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The slices in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().copied()
    }
}

impl FromIterator<u32> for SliceSet {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        SliceSet(iter.into_iter().collect())
    }
}

impl fmt::Display for SliceSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut iter = self.0.iter().copied().peekable();
        let mut first = true;
        while let Some(start) = iter.next() {
            let mut end = start;
            while iter.peek() == Some(&(end + 1)) {
                end += 1;
                iter.next();
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
    }
}

/// A slice set text that is not `"N"` or `"N-M"` items joined by commas.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad slice set item {item:?}: expected N or N-M with N <= M")]
pub struct SliceSetError {
    /// The item that did not parse.
    pub item: String,
}

impl FromStr for SliceSet {
    type Err = SliceSetError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut set = BTreeSet::new();
        for item in text.split(',').filter(|i| !i.is_empty()) {
            let bad = || SliceSetError { item: item.to_owned() };
            let (lo, hi) = match item.split_once('-') {
                Some((lo, hi)) => (lo.parse::<u32>().map_err(|_| bad())?, hi.parse::<u32>().map_err(|_| bad())?),
                None => {
                    let n = item.parse::<u32>().map_err(|_| bad())?;
                    (n, n)
                }
            };
            if lo > hi || hi - lo > crate::slice::MAX_SLICES {
                return Err(bad());
            }
            set.extend(lo..=hi);
        }
        Ok(SliceSet(set))
    }
}

impl Serialize for SliceSet {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SliceSet {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node() -> NodeRecord {
        NodeRecord {
            v: RECORD_VERSION,
            node_id: "mail1".into(),
            host: "mail1.example.org".into(),
            pid: 4242,
            incarnation: Uuid::new_v4(),
            weight: 2,
            queues: vec!["in".into()],
            version: "0.1.0".into(),
            started_unix_ms: 1_700_000_000_000,
            metrics_addr: Some("127.0.0.1:9100".into()),
            lease_id: 7,
            refused_queues: Vec::new(),
        }
    }

    #[test]
    fn records_round_trip_through_json() {
        let n = node();
        assert_eq!(NodeRecord::decode(&n.encode()).expect("decodes"), n);
        let a = Assignment { v: 1, queue: "in".into(), slices_total: 16, slices: [0, 1, 2, 3, 7, 9, 10].into_iter().collect() };
        let text = String::from_utf8(a.encode()).expect("utf8");
        assert!(text.contains("\"slices\":\"0-3,7,9-10\""), "{text}");
        assert_eq!(Assignment::decode(text.as_bytes()).expect("decodes"), a);
        let c = SingletonClaim { v: 1, node_id: "n1".into(), incarnation: Uuid::nil(), claimed_unix_ms: 5 };
        assert_eq!(SingletonClaim::decode(&c.encode()).expect("decodes"), c);
        let r = SingletonRun { v: 1, last_slot_unix_ms: 60_000, node_id: "n1".into(), settled_unix_ms: 60_010, outcome: "ok".into() };
        assert_eq!(SingletonRun::decode(&r.encode()).expect("decodes"), r);
    }

    #[test]
    fn unknown_fields_are_accepted_for_forward_compatibility() {
        let raw = br#"{"v":1,"name":"in","slices":4,"paused":false,"future_field":true}"#;
        let q = QueueConfig::decode(raw).expect("decodes");
        assert_eq!(q.slices, 4);
        assert!(!q.mailman3);
    }

    #[test]
    fn garbage_and_other_versions_are_named_errors() {
        let err = NodeRecord::decode(b"not json").expect_err("garbage");
        assert!(err.to_string().starts_with("node record is malformed"), "{err}");
        let err = QueueConfig::decode(br#"{"v":2,"name":"in","slices":4}"#).expect_err("v2");
        assert!(matches!(err, RecordError::UnsupportedVersion { kind: "queue", found: 2 }), "{err}");
        let err = QueueConfig::decode(br#"{"name":"in","slices":4}"#).expect_err("no version");
        assert!(matches!(err, RecordError::UnsupportedVersion { found: 0, .. }), "{err}");
        let err = Claim::decode(br#"{"v":1,"node_id":3}"#).expect_err("wrong shape");
        assert!(matches!(err, RecordError::Malformed { kind: "claim", .. }), "{err}");
        let err = Assignment::decode(br#"{"v":1,"queue":"in","slices_total":4,"slices":"3-1"}"#).expect_err("reversed range");
        assert!(err.to_string().contains("3-1"), "{err}");
    }

    #[test]
    fn node_with_no_queue_list_serves_every_queue() {
        let mut n = node();
        assert!(n.serves("in") && !n.serves("out"));
        n.queues.clear();
        assert!(n.serves("out"));
    }

    proptest! {
        #[test]
        fn slice_sets_round_trip_as_ranges(slices in proptest::collection::btree_set(0u32..2000, 0..300)) {
            let set: SliceSet = slices.iter().copied().collect();
            let text = set.to_string();
            let back: SliceSet = text.parse().expect("own output parses");
            prop_assert_eq!(back, set);
        }
    }
}
