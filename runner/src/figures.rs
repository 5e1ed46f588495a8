//! The figures a runner publishes for the slices it holds: per-slice depth and oldest-entry
//! age as metrics on every listing, and its own slices' figures (plus, from the holder of
//! slice 0, the non-empty slices nobody on this node holds) to etcd every
//! [`STATUS_INTERVAL`], attached to the lease. Handled queues publish from their processing
//! loop; supervised queues from [`supervised_figures`], since Mailman lists those itself.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use qslice_common::etcd::REQUEST_TIMEOUT;
use qslice_common::lease::{unix_ms, Fence};
use qslice_common::spool::{QueueDir, Scan};
use qslice_proto::records::{Record, SliceFigures, SliceStatus, RECORD_VERSION};

use crate::incarnation::Shared;
use crate::ownership::QueueSlices;

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
            publish_figures(&queue, total, &scan);
            if publish {
                publish_status(&mut client, &shared, &dir, &scan, &owned, lease_id).await;
            }
        }
        if publish {
            last_status = Some(tokio::time::Instant::now());
        }
    }
}

/// Per-slice depth and oldest-entry age of every slice the listing saw.
pub(crate) fn publish_figures(queue: &str, slices_total: u32, scan: &Scan) {
    for slice in 0..slices_total {
        let depth = scan.pending.get(&slice).map_or(0, |v| v.len());
        let labels = [("queue", queue.to_owned()), ("slice", slice.to_string())];
        metrics::gauge!("qslice_runner_slice_depth", &labels).set(depth as f64);
        metrics::gauge!("qslice_runner_slice_oldest_age_seconds", &labels).set(scan.oldest_age(slice).unwrap_or(0.0));
    }
}

/// Publishes this node's figures for its own slices to etcd (attached to the lease). The
/// holder of slice 0 also reports the non-empty slices nobody in this node holds, so the
/// coordinator sees idle entries without every runner reporting every slice.
pub(crate) async fn publish_status(client: &mut Client, shared: &Shared, dir: &QueueDir, scan: &Scan, owned: &[u32], lease_id: i64) {
    let reporter = owned.contains(&0);
    let figures: Vec<SliceFigures> = (0..scan.slices_total)
        .filter(|s| owned.contains(s) || (reporter && (scan.pending.contains_key(s) || scan.in_flight.contains_key(s))))
        .map(|s| SliceFigures {
            slice: s,
            depth: scan.pending.get(&s).map_or(0, |v| v.len() as u64),
            in_flight: scan.in_flight.get(&s).map_or(0, |v| v.len() as u64),
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
