//! The invariant checker: from what the handlers recorded, what was enqueued, what the
//! spool holds at the end, the claims that were granted and the disruptions the test
//! caused, it proves the invariants of DESIGN.md:
//!
//! - nothing lost: every enqueued entry finished, or was preserved in `bad/` or quarantine;
//! - single owner: no entry started under an epoch older than a newer claim of its slice
//!   that had already been granted when it started;
//! - duplicates only for entries in flight on a runner that was killed or fenced: a second
//!   start of an entry is explained only by a disruption of the first start's node between
//!   the two starts;
//! - and it measures each slice's longest idle time (an entry waited and nothing of its
//!   slice was processing).

use std::collections::{BTreeMap, BTreeSet};

use std::sync::{Arc, Mutex};

use qslice_common::etcd::{PrefixUpdate, PrefixWatch};
use qslice_proto::keys::{Key, Keys};

use crate::cluster::Rec;
use crate::now_ns;

/// How long before a handler's own "start" record its runner may have dispatched the entry
/// (dequeue, then spawn the handler process). A runner killed or frozen in that window
/// still had the entry in flight: the handler, a process of its own, records its start a
/// little after the runner stopped. Seen here: up to a few ms; allowed with room for a
/// loaded machine. A runner cannot dispatch anything while dead, frozen or fenced, so this
/// cannot excuse a start made after a disruption.
pub const DISPATCH_SLACK_NS: u128 = 500_000_000;

/// A claim grant seen by the test's observer.
#[derive(Clone, Debug)]
pub struct Grant {
    /// The slice.
    pub slice: u32,
    /// The claim's epoch.
    pub epoch: i64,
    /// When the observer saw it (ns since the Unix epoch); the grant happened before.
    pub seen_ns: u128,
}

/// Something the test did to a node (kill -9, SIGSTOP past the TTL, an etcd restart for
/// every node).
#[derive(Clone, Debug)]
pub struct Disruption {
    /// The node, or `*` for all.
    pub node: String,
    /// When (ns since the Unix epoch).
    pub at_ns: u128,
    /// What was done.
    pub what: String,
}

/// What the checker found.
#[derive(Debug, Default)]
pub struct Report {
    /// Entries enqueued.
    pub enqueued: usize,
    /// Entries finished (at least once).
    pub finished: usize,
    /// Entries preserved in bad/ or quarantined.
    pub preserved: usize,
    /// Entries neither finished nor preserved.
    pub lost: Vec<String>,
    /// Starts under a stale epoch: (entry, slice, epoch, newer epoch already granted).
    pub stale_starts: Vec<(String, u32, i64, i64)>,
    /// Entries started more than once, with a disruption of the first node to explain it.
    pub explained_duplicates: Vec<String>,
    /// Entries started more than once with nothing to explain it.
    pub unexplained_duplicates: Vec<String>,
    /// Longest idle time per slice in milliseconds.
    pub longest_idle_ms: BTreeMap<u32, u128>,
}

impl Report {
    /// Whether every invariant held.
    pub fn ok(&self) -> bool {
        self.lost.is_empty() && self.stale_starts.is_empty() && self.unexplained_duplicates.is_empty()
    }

    /// A readable summary.
    pub fn summary(&self) -> String {
        let idle_max = self.longest_idle_ms.values().max().copied().unwrap_or(0);
        format!(
            "enqueued {}, finished {}, preserved {}, lost {}, stale starts {}, duplicates {} explained / {} unexplained, longest idle {} ms (per slice: {:?})",
            self.enqueued,
            self.finished,
            self.preserved,
            self.lost.len(),
            self.stale_starts.len(),
            self.explained_duplicates.len(),
            self.unexplained_duplicates.len(),
            idle_max,
            self.longest_idle_ms
        )
    }
}

/// Checks the records. `enqueued` maps each entry's file base to its enqueue time (ns) and
/// slice; `preserved` holds the file bases found in bad/ or quarantine at the end.
pub fn check(enqueued: &BTreeMap<String, (u128, u32)>, records: &[Rec], preserved: &BTreeSet<String>, grants: &[Grant], disruptions: &[Disruption]) -> Report {
    let mut report = Report { enqueued: enqueued.len(), ..Report::default() };
    let finished: BTreeSet<&str> = records.iter().filter(|r| r.what == "end").map(|r| r.filebase.as_str()).collect();
    report.finished = finished.len();
    report.preserved = enqueued.keys().filter(|k| preserved.contains(*k) && !finished.contains(k.as_str())).count();
    report.lost = enqueued.keys().filter(|k| !finished.contains(k.as_str()) && !preserved.contains(*k)).cloned().collect();

    // Single owner: a start under epoch e of slice s at time t is stale if a grant of s
    // with an epoch above e had been seen before t.
    let mut by_slice: BTreeMap<u32, Vec<&Grant>> = BTreeMap::new();
    for g in grants {
        by_slice.entry(g.slice).or_default().push(g);
    }
    let starts: Vec<&Rec> = records.iter().filter(|r| r.what == "start").collect();
    for r in &starts {
        if let Some(newer) = by_slice.get(&r.slice).and_then(|gs| gs.iter().filter(|g| g.epoch > r.epoch && g.seen_ns < r.at_ns).map(|g| g.epoch).max()) {
            report.stale_starts.push((r.filebase.clone(), r.slice, r.epoch, newer));
        }
    }

    // Duplicates.
    let mut runs: BTreeMap<&str, Vec<&Rec>> = BTreeMap::new();
    for r in &starts {
        runs.entry(r.filebase.as_str()).or_default().push(r);
    }
    for (entry, mut list) in runs {
        if list.len() < 2 {
            continue;
        }
        list.sort_by_key(|r| r.at_ns);
        let explained =
            list.windows(2).all(|w| disruptions.iter().any(|d| (d.node == w[0].node || d.node == "*") && d.at_ns + DISPATCH_SLACK_NS >= w[0].at_ns && d.at_ns <= w[1].at_ns));
        if explained {
            report.explained_duplicates.push(entry.to_owned());
        } else {
            report.unexplained_duplicates.push(entry.to_owned());
        }
    }

    // Idle: for each entry, the time from when it waited with nothing of its slice in
    // progress until its first start.
    let mut activity: BTreeMap<u32, Vec<u128>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.what == "start" || r.what == "end") {
        activity.entry(r.slice).or_default().push(r.at_ns);
    }
    for v in activity.values_mut() {
        v.sort_unstable();
    }
    let first_start: BTreeMap<&str, u128> = starts.iter().fold(BTreeMap::new(), |mut m, r| {
        let e = m.entry(r.filebase.as_str()).or_insert(r.at_ns);
        *e = (*e).min(r.at_ns);
        m
    });
    for (entry, (enq_ns, slice)) in enqueued {
        let Some(&start) = first_start.get(entry.as_str()) else { continue };
        let last_activity = activity.get(slice).and_then(|v| v.iter().rev().find(|t| **t < start).copied()).unwrap_or(0);
        let idle_from = (*enq_ns).max(last_activity);
        let idle_ms = start.saturating_sub(idle_from) / 1_000_000;
        let e = report.longest_idle_ms.entry(*slice).or_insert(0);
        *e = (*e).max(idle_ms);
    }
    report
}

/// Records every claim grant (a claim key created) of `cluster` it sees, with when.
pub fn observe_grants(client: etcd_client::Client, cluster: &str) -> (Arc<Mutex<Vec<Grant>>>, tokio::task::JoinHandle<()>) {
    let grants = Arc::new(Mutex::new(Vec::<Grant>::new()));
    let keys = Keys::new(cluster).expect("keys");
    let mut watch = PrefixWatch::new(client, keys.claims_prefix());
    let task = {
        let grants = grants.clone();
        tokio::spawn(async move {
            loop {
                let update = watch.next().await;
                let seen_ns = now_ns();
                let kvs = match update {
                    PrefixUpdate::Snapshot(kvs) => kvs,
                    PrefixUpdate::Put(kv) => vec![kv],
                    PrefixUpdate::Delete(_) => continue,
                };
                let mut g = grants.lock().expect("grants");
                for kv in kvs {
                    if let Some(Key::Claim { slice, .. }) = keys.parse(kv.key()) {
                        g.push(Grant { slice, epoch: kv.create_revision(), seen_ns });
                    }
                }
            }
        })
    };
    (grants, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(what: &str, entry: &str, node: &str, epoch: i64, slice: u32, at_ns: u128) -> Rec {
        Rec { what: what.into(), filebase: entry.into(), node: node.into(), epoch, slice, at_ns, slices: 2 }
    }

    fn enq(entries: &[(&str, u128, u32)]) -> BTreeMap<String, (u128, u32)> {
        entries.iter().map(|(e, t, s)| (e.to_string(), (*t, *s))).collect()
    }

    #[test]
    fn a_clean_run_passes_and_idle_time_is_measured() {
        let records = vec![
            rec("start", "e1", "a", 5, 0, 100_000_000),
            rec("end", "e1", "a", 5, 0, 110_000_000),
            rec("start", "e2", "a", 5, 0, 400_000_000),
            rec("end", "e2", "a", 5, 0, 410_000_000),
        ];
        let report = check(&enq(&[("e1", 0, 0), ("e2", 200_000_000, 0)]), &records, &BTreeSet::new(), &[], &[]);
        assert!(report.ok(), "{}", report.summary());
        assert_eq!(report.finished, 2);
        // e1 waited 100 ms with nothing running; e2 waited 200 ms after e1 ended.
        assert_eq!(report.longest_idle_ms[&0], 200);
    }

    #[test]
    fn a_lost_entry_a_stale_start_and_an_unexplained_duplicate_are_each_caught() {
        let grants = vec![Grant { slice: 0, epoch: 5, seen_ns: 0 }, Grant { slice: 0, epoch: 9, seen_ns: 500 }];
        let records = vec![
            rec("start", "e1", "a", 5, 0, 100),
            rec("end", "e1", "a", 5, 0, 200),
            // Starts under epoch 5 after epoch 9 was granted: stale.
            rec("start", "e2", "a", 5, 0, 600),
            rec("end", "e2", "a", 5, 0, 700),
            // e1 again under the new owner with no disruption in between: unexplained.
            rec("start", "e1", "b", 9, 0, 800),
            rec("end", "e1", "b", 9, 0, 900),
        ];
        let report = check(&enq(&[("e1", 0, 0), ("e2", 0, 0), ("e3", 0, 0)]), &records, &BTreeSet::new(), &grants, &[]);
        assert_eq!(report.lost, vec!["e3"]);
        assert_eq!(report.stale_starts, vec![("e2".to_owned(), 0, 5, 9)]);
        assert_eq!(report.unexplained_duplicates, vec!["e1"]);
        assert!(!report.ok());
        // A kill of a between the two runs explains the duplicate; bad/ explains e3.
        let kill = Disruption { node: "a".into(), at_ns: 750, what: "kill -9".into() };
        let report =
            check(&enq(&[("e1", 0, 0), ("e3", 0, 0)]), &records[..2].iter().chain(&records[4..]).cloned().collect::<Vec<_>>(), &["e3".to_owned()].into(), &grants[..1], &[kill]);
        assert!(report.ok(), "{}", report.summary());
        assert_eq!(report.explained_duplicates, vec!["e1"]);
        assert_eq!(report.preserved, 1);
    }

    #[test]
    fn a_handler_that_logs_its_start_just_after_its_runner_froze_was_still_in_flight() {
        let records = vec![
            rec("start", "e1", "a", 5, 0, 1_004_000_000),
            rec("end", "e1", "a", 5, 0, 1_030_000_000),
            rec("start", "e1", "b", 9, 0, 4_000_000_000),
            rec("end", "e1", "b", 9, 0, 4_030_000_000),
        ];
        let frozen = Disruption { node: "a".into(), at_ns: 1_000_000_000, what: "SIGSTOP".into() };
        let report = check(&enq(&[("e1", 0, 0)]), &records, &BTreeSet::new(), &[], &[frozen]);
        assert_eq!(report.explained_duplicates, vec!["e1"], "{}", report.summary());
        // A disruption long before the first start explains nothing.
        let long_before = Disruption { node: "a".into(), at_ns: 100_000_000, what: "SIGSTOP".into() };
        let report = check(&enq(&[("e1", 0, 0)]), &records, &BTreeSet::new(), &[], &[long_before]);
        assert_eq!(report.unexplained_duplicates, vec!["e1"]);
    }
}
