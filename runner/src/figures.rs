//! The figures a runner publishes for the slices it holds: queue-level depth and oldest
//! entry age, and per-slice depth and oldest-entry age of the slices it holds (at most
//! `metrics_slice_series` slice numbers per queue), as metrics on every listing; and its own slices' figures (plus, from the holder of
//! slice 0, the non-empty slices nobody on this node holds) to etcd every
//! [`STATUS_INTERVAL`], attached to the lease. Handled queues publish from their processing
//! loop; supervised queues from [`supervised_figures`], since Mailman lists those itself.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use metrics::Gauge;
use qslice_common::etcd::REQUEST_TIMEOUT;
use qslice_common::lease::{unix_ms, Fence};
use qslice_common::spool::{QueueDir, Scan};
use qslice_proto::records::{Record, SliceFigures, SliceStatus, RECORD_VERSION};

use crate::ownership::QueueSlices;
use crate::shared::Shared;

/// How often a runner publishes its slice figures to etcd.
pub(crate) const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// How often the figures of supervised queues are taken: the queue is listed by Mailman
/// itself, so this listing is only for status, metrics and alerts.
const SUPERVISED_FIGURES_EVERY: Duration = Duration::from_secs(1);

/// The supervised slices held, per queue, as the figures task reads them.
pub(crate) type SupervisedView = BTreeMap<String, QueueSlices>;

/// Lists each supervised queue this node holds slices of (one listing per queue) and
/// publishes its slices' figures, as the queue loop does for handled queues: the depth,
/// the oldest entry's age and the `.bak` files with their age, as metrics every pass and
/// to etcd every [`STATUS_INTERVAL`].
pub(crate) async fn supervised_figures(mut client: Client, shared: Arc<Shared>, lease_id: i64, fence: Arc<Fence>, view: Arc<Mutex<SupervisedView>>) {
    let mut tick = tokio::time::interval(SUPERVISED_FIGURES_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_status = None::<tokio::time::Instant>;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = fence.lost().cancelled() => return,
        }
        let queues: SupervisedView = view.lock().expect("supervised view").clone();
        let publish = last_status.is_none_or(|t| t.elapsed() >= STATUS_INTERVAL);
        for (queue, held) in queues.into_iter().filter(|(_, held)| !held.slices.is_empty()) {
            let total = held.slices_total;
            let owned: Vec<u32> = held.slices.into_iter().collect();
            let dir = QueueDir::new(&shared.cfg.spool, &queue);
            let listed = {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || dir.scan(total)).await
            };
            let Ok(Ok(scan)) = listed else { continue };
            publish_figures(&queue, &scan, &owned, shared.cfg.metrics_slice_series);
            if publish {
                publish_status(&mut client, &shared, &dir, &scan, &owned, lease_id).await;
            }
        }
        if publish {
            last_status = Some(tokio::time::Instant::now());
        }
    }
}

/// The per-slice series this process created, per queue (the process's recorder is global,
/// and so is this). The recorder cannot remove a series, so a slice number that got series
/// keeps them for the life of the process: at most the cap of them per queue.
static SERIES: LazyLock<Mutex<HashMap<String, QueueSeries>>> = LazyLock::new(Default::default);

/// The gauges of one queue: the queue-level aggregates and the slices with series.
struct QueueSeries {
    /// `qslice_runner_queue_depth{queue}`.
    depth: Gauge,
    /// `qslice_runner_queue_oldest_age_seconds{queue}`.
    oldest_age: Gauge,
    /// The slices with per-slice series, by slice number.
    slices: BTreeMap<u32, SliceGauges>,
}

/// The per-slice gauges of one slice and whether the last listing had it held here.
struct SliceGauges {
    /// `qslice_runner_slice_depth{queue,slice}`.
    depth: Gauge,
    /// `qslice_runner_slice_oldest_age_seconds{queue,slice}`.
    oldest_age: Gauge,
    /// Held at the last listing (a slice released since is set to 0 once, then left alone).
    held: bool,
}

/// Which slices get per-slice series at this listing.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct SeriesSelection {
    /// Held slices that get new series (the lowest-numbered held slices without series,
    /// while fewer than the cap have series).
    pub(crate) add: Vec<u32>,
    /// Held slices whose series are set (those that have series, and `add`).
    pub(crate) set: Vec<u32>,
    /// Slices with series that were held at the last listing and no longer are: set to 0.
    pub(crate) released: Vec<u32>,
}

/// Chooses the per-slice series of one queue: only slices held here (`held`, sorted) ever
/// get series, at most `cap` slice numbers in all (`with_series`: those that have them,
/// with whether they were held at the last listing), first come, lowest number first.
pub(crate) fn select_series(with_series: &BTreeMap<u32, bool>, held: &[u32], cap: usize) -> SeriesSelection {
    let room = cap.saturating_sub(with_series.len());
    let add: Vec<u32> = held.iter().copied().filter(|s| !with_series.contains_key(s)).take(room).collect();
    let mut set: Vec<u32> = held.iter().copied().filter(|s| with_series.contains_key(s)).chain(add.iter().copied()).collect();
    set.sort_unstable();
    let released = with_series.iter().filter(|(s, was_held)| **was_held && held.binary_search(s).is_err()).map(|(s, _)| *s).collect();
    SeriesSelection { add, set, released }
}

/// Publishes a listing's figures as metrics: the queue's total depth and oldest waiting
/// entry over every slice listed, and per-slice depth and oldest-entry age of the slices
/// held here (`owned`), for at most `cap` slice numbers per queue (see [`select_series`]).
pub(crate) fn publish_figures(queue: &str, scan: &Scan, owned: &[u32], cap: usize) {
    let mut series = SERIES.lock().expect("series lock");
    let q = series.entry(queue.to_owned()).or_insert_with(|| QueueSeries {
        depth: metrics::gauge!("qslice_runner_queue_depth", "queue" => queue.to_owned()),
        oldest_age: metrics::gauge!("qslice_runner_queue_oldest_age_seconds", "queue" => queue.to_owned()),
        slices: BTreeMap::new(),
    });
    let total = scan.total_depth();
    let oldest = scan.slices_with_entries().into_iter().filter_map(|s| scan.oldest_age(s)).fold(0.0, f64::max);
    q.depth.set(total as f64);
    q.oldest_age.set(oldest);
    let mut held = owned.to_vec();
    held.sort_unstable();
    let with_series: BTreeMap<u32, bool> = q.slices.iter().map(|(s, g)| (*s, g.held)).collect();
    let chosen = select_series(&with_series, &held, cap);
    for slice in chosen.add {
        q.slices.insert(
            slice,
            SliceGauges {
                depth: metrics::gauge!("qslice_runner_slice_depth", "queue" => queue.to_owned(), "slice" => slice.to_string()),
                oldest_age: metrics::gauge!("qslice_runner_slice_oldest_age_seconds", "queue" => queue.to_owned(), "slice" => slice.to_string()),
                held: true,
            },
        );
    }
    for slice in chosen.released {
        if let Some(g) = q.slices.get_mut(&slice) {
            g.depth.set(0.0);
            g.oldest_age.set(0.0);
            g.held = false;
        }
    }
    for slice in chosen.set {
        if let Some(g) = q.slices.get_mut(&slice) {
            g.depth.set(scan.depth(slice) as f64);
            g.oldest_age.set(scan.oldest_age(slice).unwrap_or(0.0));
            g.held = true;
        }
    }
}

/// Publishes this node's figures for its own slices to etcd (attached to the lease). The
/// holder of slice 0 also reports the non-empty slices nobody in this node holds, so the
/// coordinator sees idle entries without every runner reporting every slice.
pub(crate) async fn publish_status(client: &mut Client, shared: &Shared, dir: &QueueDir, scan: &Scan, owned: &[u32], lease_id: i64) {
    let reporter = owned.contains(&0);
    let figures: Vec<SliceFigures> = (0..scan.slices_total)
        .filter(|s| owned.contains(s) || (reporter && scan.depth(*s) + scan.in_flight_count(*s) > 0))
        .map(|s| SliceFigures {
            slice: s,
            depth: scan.depth(s) as u64,
            in_flight: scan.in_flight_count(s) as u64,
            oldest_age_ms: (scan.oldest_age(s).unwrap_or(0.0) * 1000.0) as u64,
            oldest_in_flight_age_ms: scan.in_flight.get(&s).and_then(|e| dir.oldest_in_flight_age(e)).map_or(0, |a| (a * 1000.0) as u64),
        })
        .collect();
    let status = SliceStatus {
        v: RECORD_VERSION,
        node_id: shared.cfg.node_id.clone(),
        queue: dir.queue().to_owned(),
        slices_total: scan.slices_total,
        listed_unix_ms: unix_ms(),
        slices: figures,
    };
    let key = shared.keys.status(&shared.cfg.node_id, dir.queue());
    let put = client.put(key, status.encode(), Some(PutOptions::new().with_lease(lease_id)));
    if let Ok(Err(e)) = tokio::time::timeout(REQUEST_TIMEOUT, put).await {
        tracing::debug!(error = %e, "publishing slice figures failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(series: &[(u32, bool)]) -> BTreeMap<u32, bool> {
        series.iter().copied().collect()
    }

    #[test]
    fn only_held_slices_get_series_and_never_more_than_the_cap() {
        // 65,536 slices held, cap 256: the 256 lowest get series, no more.
        let held: Vec<u32> = (0..65_536).collect();
        let first = select_series(&BTreeMap::new(), &held, 256);
        assert_eq!(first.add, (0..256).collect::<Vec<_>>());
        assert_eq!(first.set, first.add);
        assert!(first.released.is_empty());
        // At the cap nothing is added, whatever is held.
        let full: BTreeMap<u32, bool> = (0..256).map(|s| (s, true)).collect();
        let next = select_series(&full, &held, 256);
        assert!(next.add.is_empty());
        assert_eq!(next.set.len(), 256);
    }

    #[test]
    fn released_slices_are_zeroed_once_and_keep_their_place_under_the_cap() {
        // Slices 1, 2, 3 have series; 2 was released; 3 is released now; 7 and 9 are new.
        let selection = select_series(&with(&[(1, true), (2, false), (3, true)]), &[1, 7, 9], 4);
        // One slot left under the cap of 4 (released slices keep theirs): 7 gets it.
        assert_eq!(selection, SeriesSelection { add: vec![7], set: vec![1, 7], released: vec![3] });
        // A released slice held again is set again.
        let again = select_series(&with(&[(1, true), (2, false), (3, false), (7, true)]), &[2, 7], 4);
        assert_eq!(again, SeriesSelection { add: vec![], set: vec![2, 7], released: vec![1] });
    }

    #[test]
    fn a_cap_of_zero_exports_no_per_slice_series() {
        assert_eq!(select_series(&BTreeMap::new(), &[0, 1, 2], 0), SeriesSelection::default());
    }
}
