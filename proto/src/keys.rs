//! The etcd key layout: the only module that knows the prefix scheme.
//!
//! Every key of a cluster lives under `/qslice/<cluster>/`:
//!
//! | key | value | lease | written by |
//! |---|---|---|---|
//! | `nodes/<node>` | [`NodeRecord`](crate::records::NodeRecord) | the runner's | runner |
//! | `queues/<queue>` | [`QueueConfig`](crate::records::QueueConfig) | none | admin API |
//! | `assign/<node>/<queue>` | [`Assignment`](crate::records::Assignment) | none | leader |
//! | `claims/<queue>/<slice>` | [`Claim`](crate::records::Claim) | the runner's | runner |
//! | `status/<node>/<queue>` | [`SliceStatus`](crate::records::SliceStatus) | the runner's | runner |
//! | `cordons/<node>` | [`Cordon`](crate::records::Cordon) | none | admin API |
//! | `pins/<queue>/<slice>` | [`Pin`](crate::records::Pin) | none | admin API |
//! | `control/maintenance` | [`Maintenance`](crate::records::Maintenance) | none | admin API |
//! | `control/rebalance` | [`RebalanceRequest`](crate::records::RebalanceRequest) | none | admin API (the leader deletes it) |
//! | `moves/<queue>/<slice>` | [`MoveRequest`](crate::records::MoveRequest) | none | admin API (the leader deletes it) |
//! | `singletons/<name>` | [`SingletonClaim`](crate::records::SingletonClaim) | the runner's | runner (the holder of a singleton command) |
//! | `singleton-runs/<name>` | [`SingletonRun`](crate::records::SingletonRun) | none | runner (the holder, under its claim) |
//! | `holds/<queue>/<slice>` | [`Hold`](crate::records::Hold) | the leader's (the revoked lease's TTL) | leader, before it revokes a runner's lease |
//! | `singleton-holds/<name>` | [`Hold`](crate::records::Hold) | the leader's (the revoked lease's TTL) | leader, before it revokes a runner's lease |
//! | `coordinators/<id>` | [`CoordinatorRecord`](crate::records::CoordinatorRecord) | the coordinator's | coordinator |
//! | `election` | the leader's id (etcd election API) | the coordinator's | coordinator |
//!
//! Why the assignment is keyed by node and then queue: a runner watches only
//! `assign/<its id>/`, so a runner's etcd load does not grow with the number of runners,
//! and one value holds all of one node's slices of one queue as ranges (100,000 slices of
//! one queue on one node stay far below etcd's 1.5 MiB request limit). A failover rewrites
//! one key per (receiving node, queue), so even a large one fits a few transactions of at
//! most 128 operations. Claims are one key per slice because "create only if absent"
//! needs a key per slice, and its create revision is the slice's epoch.
//!
//! Slice numbers in keys are zero-padded to five digits so that etcd lists them in order.

use std::fmt;

/// The key prefix of one qslice cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    root: String,
}

/// A name that cannot be used inside a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("{what} must not be empty")]
    Empty {
        /// Which name: "queue", "node id", "cluster".
        what: &'static str,
    },
    /// The name holds `/`, is `.` or `..`, or has a character outside the allowed set.
    #[error("{what} {name:?} is not allowed: use letters, digits, '.', '_' and '-' (not '.' or '..' alone), at most 253 characters")]
    Invalid {
        /// Which name.
        what: &'static str,
        /// The rejected name.
        name: String,
    },
}

/// Checks a queue name, node id or cluster name: 1 to 253 characters of letters, digits,
/// `.`, `_`, `-`, and not `.` or `..` (which would walk out of the spool directory).
pub fn validate_name(what: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { what });
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.len() > 253 || name == "." || name == ".." || !name.chars().all(allowed) {
        return Err(NameError::Invalid { what, name: name.to_owned() });
    }
    Ok(())
}

/// A key that parsed into its parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    /// `nodes/<node>`
    Node {
        /// The runner's node id.
        node: String,
    },
    /// `queues/<queue>`
    Queue {
        /// The queue name.
        queue: String,
    },
    /// `assign/<node>/<queue>`
    Assignment {
        /// The node the slices are assigned to.
        node: String,
        /// The queue.
        queue: String,
    },
    /// `claims/<queue>/<slice>`
    Claim {
        /// The queue.
        queue: String,
        /// The slice number.
        slice: u32,
    },
    /// `status/<node>/<queue>`
    Status {
        /// The reporting node.
        node: String,
        /// The queue.
        queue: String,
    },
    /// `cordons/<node>`
    Cordon {
        /// The cordoned node.
        node: String,
    },
    /// `holds/<queue>/<slice>`
    Hold {
        /// The queue.
        queue: String,
        /// The slice number.
        slice: u32,
    },
    /// `pins/<queue>/<slice>`
    Pin {
        /// The queue.
        queue: String,
        /// The pinned slice.
        slice: u32,
    },
    /// `control/maintenance`
    Maintenance,
    /// `control/rebalance`
    Rebalance,
    /// `moves/<queue>/<slice>`
    Move {
        /// The queue.
        queue: String,
        /// The slice to move.
        slice: u32,
    },
    /// `coordinators/<id>`
    Coordinator {
        /// The coordinator's id.
        id: String,
    },
    /// `election` and the election API's keys below it.
    Election,
}

impl Keys {
    /// The keys of cluster `cluster`; the name must pass [`validate_name`].
    pub fn new(cluster: &str) -> Result<Keys, NameError> {
        validate_name("cluster", cluster)?;
        Ok(Keys { root: format!("/qslice/{cluster}/") })
    }

    /// The prefix of every key of the cluster.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// Prefix of all node records.
    pub fn nodes_prefix(&self) -> String {
        format!("{}nodes/", self.root)
    }
    /// The node record of `node`.
    pub fn node(&self, node: &str) -> String {
        format!("{}nodes/{node}", self.root)
    }
    /// Prefix of all queue configs.
    pub fn queues_prefix(&self) -> String {
        format!("{}queues/", self.root)
    }
    /// The config of `queue`.
    pub fn queue(&self, queue: &str) -> String {
        format!("{}queues/{queue}", self.root)
    }
    /// Prefix of the whole assignment.
    pub fn assignments_prefix(&self) -> String {
        format!("{}assign/", self.root)
    }
    /// Prefix of one node's assignment: what that runner watches.
    pub fn node_assignments_prefix(&self, node: &str) -> String {
        format!("{}assign/{node}/", self.root)
    }
    /// The slices of `queue` assigned to `node`.
    pub fn assignment(&self, node: &str, queue: &str) -> String {
        format!("{}assign/{node}/{queue}", self.root)
    }
    /// Prefix of all claims.
    pub fn claims_prefix(&self) -> String {
        format!("{}claims/", self.root)
    }
    /// Prefix of the claims of one queue.
    pub fn queue_claims_prefix(&self, queue: &str) -> String {
        format!("{}claims/{queue}/", self.root)
    }
    /// The claim of one slice.
    pub fn claim(&self, queue: &str, slice: u32) -> String {
        format!("{}claims/{queue}/{}", self.root, SliceNo(slice))
    }
    /// Prefix of all published slice figures.
    pub fn status_prefix(&self) -> String {
        format!("{}status/", self.root)
    }
    /// The slice figures `node` publishes for `queue`.
    pub fn status(&self, node: &str, queue: &str) -> String {
        format!("{}status/{node}/{queue}", self.root)
    }
    /// Prefix of all cordons.
    pub fn cordons_prefix(&self) -> String {
        format!("{}cordons/", self.root)
    }
    /// The cordon of `node`.
    pub fn cordon(&self, node: &str) -> String {
        format!("{}cordons/{node}", self.root)
    }
    /// Prefix of all pins.
    pub fn pins_prefix(&self) -> String {
        format!("{}pins/", self.root)
    }
    /// The pin of one slice.
    pub fn pin(&self, queue: &str, slice: u32) -> String {
        format!("{}pins/{queue}/{}", self.root, SliceNo(slice))
    }
    /// The maintenance switch.
    pub fn maintenance(&self) -> String {
        format!("{}control/maintenance", self.root)
    }
    /// The one-shot rebalance request.
    pub fn rebalance(&self) -> String {
        format!("{}control/rebalance", self.root)
    }
    /// Prefix of all move requests.
    pub fn moves_prefix(&self) -> String {
        format!("{}moves/", self.root)
    }
    /// A request to move one slice.
    pub fn move_request(&self, queue: &str, slice: u32) -> String {
        format!("{}moves/{queue}/{}", self.root, SliceNo(slice))
    }
    /// Prefix of all singleton claims.
    pub fn singletons_prefix(&self) -> String {
        format!("{}singletons/", self.root)
    }
    /// The claim of the singleton command `name`.
    pub fn singleton(&self, name: &str) -> String {
        format!("{}singletons/{name}", self.root)
    }
    /// Prefix of all slice holds.
    pub fn holds_prefix(&self) -> String {
        format!("{}holds/", self.root)
    }
    /// The hold on one slice: nobody may claim it while the key exists.
    pub fn hold(&self, queue: &str, slice: u32) -> String {
        format!("{}holds/{queue}/{}", self.root, SliceNo(slice))
    }
    /// The hold on the singleton command `name`: nobody may claim it while the key exists.
    pub fn singleton_hold(&self, name: &str) -> String {
        format!("{}singleton-holds/{name}", self.root)
    }
    /// Prefix of all periodic singletons' last settled slots.
    pub fn singleton_runs_prefix(&self) -> String {
        format!("{}singleton-runs/", self.root)
    }
    /// The last settled slot of the periodic singleton `name`.
    pub fn singleton_run(&self, name: &str) -> String {
        format!("{}singleton-runs/{name}", self.root)
    }
    /// The singleton name of a `singletons/<name>` key of this cluster. (Kept out of
    /// [`Keys::parse`] so that matches over [`Key`] stay as they are.)
    pub fn parse_singleton(&self, key: &[u8]) -> Option<String> {
        let name = std::str::from_utf8(key).ok()?.strip_prefix(&self.root)?.strip_prefix("singletons/")?;
        validate_name("singleton", name).ok().map(|()| name.to_owned())
    }

    /// Prefix of the coordinator records.
    pub fn coordinators_prefix(&self) -> String {
        format!("{}coordinators/", self.root)
    }
    /// The record of one coordinator instance.
    pub fn coordinator(&self, id: &str) -> String {
        format!("{}coordinators/{id}", self.root)
    }
    /// The election name (the election API keeps its candidates below it).
    pub fn election(&self) -> String {
        format!("{}election", self.root)
    }

    /// Parses a key of this cluster; `None` for keys outside it or of an unknown shape.
    pub fn parse(&self, key: &[u8]) -> Option<Key> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(&self.root)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let slice = |s: &str| s.parse::<u32>().ok();
        let own = |s: &str| Some(s.to_owned()).filter(|s| !s.is_empty());
        match parts.as_slice() {
            ["nodes", node] => Some(Key::Node { node: own(node)? }),
            ["queues", queue] => Some(Key::Queue { queue: own(queue)? }),
            ["assign", node, queue] => Some(Key::Assignment { node: own(node)?, queue: own(queue)? }),
            ["claims", queue, s] => Some(Key::Claim { queue: own(queue)?, slice: slice(s)? }),
            ["status", node, queue] => Some(Key::Status { node: own(node)?, queue: own(queue)? }),
            ["cordons", node] => Some(Key::Cordon { node: own(node)? }),
            ["pins", queue, s] => Some(Key::Pin { queue: own(queue)?, slice: slice(s)? }),
            ["holds", queue, s] => Some(Key::Hold { queue: own(queue)?, slice: slice(s)? }),
            ["control", "maintenance"] => Some(Key::Maintenance),
            ["control", "rebalance"] => Some(Key::Rebalance),
            ["moves", queue, s] => Some(Key::Move { queue: own(queue)?, slice: slice(s)? }),
            ["coordinators", id] => Some(Key::Coordinator { id: own(id)? }),
            ["election", ..] => Some(Key::Election),
            _ => None,
        }
    }
}

/// A slice number as it appears in keys.
struct SliceNo(u32);

impl fmt::Display for SliceNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:05}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_parses_back_to_its_parts() {
        let k = Keys::new("prod").expect("valid cluster");
        let cases = vec![
            (k.node("n1"), Key::Node { node: "n1".into() }),
            (k.queue("in"), Key::Queue { queue: "in".into() }),
            (k.assignment("n1", "in"), Key::Assignment { node: "n1".into(), queue: "in".into() }),
            (k.claim("in", 7), Key::Claim { queue: "in".into(), slice: 7 }),
            (k.status("n1", "out"), Key::Status { node: "n1".into(), queue: "out".into() }),
            (k.cordon("n2"), Key::Cordon { node: "n2".into() }),
            (k.pin("in", 65535), Key::Pin { queue: "in".into(), slice: 65535 }),
            (k.maintenance(), Key::Maintenance),
            (k.rebalance(), Key::Rebalance),
            (k.move_request("in", 3), Key::Move { queue: "in".into(), slice: 3 }),
            (k.hold("in", 3), Key::Hold { queue: "in".into(), slice: 3 }),
            (k.coordinator("c1"), Key::Coordinator { id: "c1".into() }),
            (format!("{}/694d7a", k.election()), Key::Election),
        ];
        for (key, want) in cases {
            assert_eq!(k.parse(key.as_bytes()), Some(want), "{key}");
        }
    }

    #[test]
    fn keys_of_other_clusters_and_unknown_shapes_are_ignored() {
        let k = Keys::new("prod").expect("valid cluster");
        let other = Keys::new("prod2").expect("valid cluster");
        assert_eq!(k.parse(other.node("n1").as_bytes()), None);
        assert_eq!(k.parse(b"/qslice/prod/nodes/"), None);
        assert_eq!(k.parse(b"/qslice/prod/claims/in/notanumber"), None);
        assert_eq!(k.parse(b"/qslice/prod/what/ever"), None);
        assert_eq!(k.parse(b"/qslice/prod/\xff"), None);
    }

    #[test]
    fn singleton_keys_parse_back_to_their_name_and_stay_out_of_parse() {
        let k = Keys::new("prod").expect("valid cluster");
        assert_eq!(k.parse_singleton(k.singleton("digests").as_bytes()), Some("digests".into()));
        assert!(k.singleton("digests").starts_with(&k.singletons_prefix()));
        assert!(k.singleton_run("digests").starts_with(&k.singleton_runs_prefix()));
        assert!(!k.singleton_run("digests").starts_with(&k.singletons_prefix()), "the runs are not listed with the claims");
        assert_eq!(k.parse_singleton(k.singleton_run("digests").as_bytes()), None);
        assert_eq!(k.parse_singleton(b"/qslice/prod/singletons/a/b"), None);
        assert_eq!(k.parse(k.singleton("digests").as_bytes()), None);
    }

    #[test]
    fn claims_list_in_slice_order() {
        let k = Keys::new("c").expect("valid cluster");
        assert!(k.claim("in", 9) < k.claim("in", 10));
        assert!(k.claim("in", 10) < k.claim("in", 65535));
        assert!(k.claim("in", 3).starts_with(&k.queue_claims_prefix("in")));
    }

    #[test]
    fn names_that_could_escape_a_directory_or_a_key_are_refused() {
        for bad in ["", ".", "..", "a/b", "/", "in out", "in\n", "ü"] {
            assert!(validate_name("queue", bad).is_err(), "{bad:?}");
        }
        for good in ["in", "out", "virgin", "bounces", "node-1.example.org", "a_b"] {
            assert_eq!(validate_name("queue", good), Ok(()));
        }
        let err = validate_name("queue", "..").expect_err("refused");
        assert!(err.to_string().contains("queue \"..\""), "{err}");
        assert!(Keys::new("a/b").is_err());
    }
}
