//! The lifecycle of the slices this incarnation runs through supervised Mailman runners
//! (one child process per slice, see [`crate::supervise`]): a child starts when its slice
//! is claimed; a release asks it for a quiet stop and deletes the claim only after it
//! exited (retrying the delete while the lease lasts); a supervisor that gives up (the runner kept crashing, or the configuration does
//! not suit) reports it so that the incarnation releases the slice and refuses its queue.
//! The held supervised slices are mirrored in a view the figures task reads.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use etcd_client::Client;
use qslice_common::lease::Fence;
use qslice_common::spool::QueueDir;
use qslice_proto::keys::Keys;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::claims::release_claim_retrying;
use crate::figures::SupervisedView;
use crate::ownership::{Held, QueueSlices, SliceId};
use crate::shared::Shared;
use crate::supervise::{SuperviseConfig, Supervised, SupervisorExit};

/// A supervised slice's supervisor gave up.
#[derive(Debug)]
pub(crate) struct GaveUp {
    /// The slice.
    pub(crate) slice: SliceId,
    /// Its claim's epoch.
    pub(crate) epoch: i64,
    /// Why, as the supervisor said.
    pub(crate) reason: String,
    /// For crashes (a cooldown), else for the configuration (until the check passes).
    pub(crate) crashed: bool,
}

/// A slice run by a supervised child process.
struct SupervisedSlice {
    /// Ask for a quiet stop.
    quiet: CancellationToken,
    /// The supervisor; it ends once the child has exited.
    task: tokio::task::JoinHandle<SupervisorExit>,
}

/// The supervised slices of one incarnation.
pub(crate) struct SupervisedSlices {
    /// The running supervisors; a slice leaves when its release starts or it is given up.
    running: BTreeMap<SliceId, SupervisedSlice>,
    /// The running slices that are held, per queue, for the figures task.
    view: Arc<Mutex<SupervisedView>>,
    /// Where supervisors report that they gave up.
    gave_up: mpsc::UnboundedSender<GaveUp>,
}

impl SupervisedSlices {
    /// No supervised slices yet; supervisors that give up report to `gave_up`.
    pub(crate) fn new(gave_up: mpsc::UnboundedSender<GaveUp>) -> SupervisedSlices {
        SupervisedSlices { running: BTreeMap::new(), view: Arc::default(), gave_up }
    }

    /// The view of held supervised slices the figures task reads.
    pub(crate) fn view(&self) -> Arc<Mutex<SupervisedView>> {
        self.view.clone()
    }

    /// Starts the child of `slice` (already in `held` with `epoch`).
    #[allow(clippy::too_many_arguments)] // the slice's claim, and the incarnation it runs under
    pub(crate) fn start(&mut self, shared: &Shared, fence: &Arc<Fence>, held: &Held, slice: SliceId, total: u32, epoch: i64, cfg: SuperviseConfig) {
        let supervised = Supervised {
            queue: slice.queue.clone(),
            slice: slice.slice,
            slices: total,
            cfg,
            dir: QueueDir::new(&shared.cfg.spool, &slice.queue),
            epoch,
            node: shared.cfg.node_id.clone(),
            fence: fence.clone(),
        };
        // A `mailman3` queue runs qslice's slice runner from its warm pool; the command
        // flavours run the configured command.
        let pool = shared.pools.get(&slice.queue).cloned();
        let quiet = CancellationToken::new();
        // A fence kills the child at once.
        let kill = fence.lost().child_token();
        let gave_up = self.gave_up.clone();
        let task = {
            let (quiet, slice) = (quiet.clone(), slice.clone());
            tokio::spawn(async move {
                let exit = match pool {
                    Some(pool) => crate::mailman3::run_slice(supervised, pool, quiet, kill).await,
                    None => supervised.run(quiet, kill).await,
                };
                match &exit {
                    SupervisorExit::GaveUp(reason) => {
                        let _ = gave_up.send(GaveUp { slice, epoch, reason: reason.clone(), crashed: true });
                    }
                    SupervisorExit::Refused(reason) => {
                        let _ = gave_up.send(GaveUp { slice, epoch, reason: reason.clone(), crashed: false });
                    }
                    SupervisorExit::Stopped | SupervisorExit::Killed => {}
                }
                exit
            })
        };
        self.running.insert(slice, SupervisedSlice { quiet, task });
        self.sync_view(held);
    }

    /// Starts the release of `slice` if it is supervised: a quiet stop, then, once the
    /// child stopped, the claim's delete; `released` hears of the slice at the end. False
    /// if `slice` is not supervised here.
    pub(crate) fn release(&mut self, slice: &SliceId, held: &Held, client: &Client, keys: &Keys, fence: &Arc<Fence>, released: &mpsc::UnboundedSender<SliceId>) -> bool {
        let Some(sup) = self.running.remove(slice) else { return false };
        self.sync_view(held);
        let epoch = held.get(slice).map(|h| h.epoch);
        let (mut client, keys, fence, released, slice) = (client.clone(), keys.clone(), fence.clone(), released.clone(), slice.clone());
        tokio::spawn(async move {
            sup.quiet.cancel();
            // The claim goes only after the child has exited.
            let exit = sup.task.await;
            let SliceId { queue, slice: number } = &slice;
            if let (Some(epoch), Ok(SupervisorExit::Stopped)) = (epoch, exit) {
                match release_claim_retrying(&mut client, &keys, queue, *number, epoch, &fence).await {
                    Ok(()) => tracing::info!(%queue, slice = number, epoch, "released supervised slice"),
                    Err(e) => tracing::warn!(%queue, slice = number, error = %e.cause(), "deleting the claim failed and the fence tripped; it ends with the lease"),
                }
            }
            let _ = released.send(slice);
        });
        true
    }

    /// Forgets a slice whose supervisor gave up (its child has exited).
    pub(crate) fn forget(&mut self, slice: &SliceId, held: &Held) {
        self.running.remove(slice);
        self.sync_view(held);
    }

    /// Asks every child for a quiet stop (on a fence their kill tokens, children of the
    /// fence's, were cancelled already) and forgets them.
    pub(crate) fn stop_all(&mut self, held: &Held) {
        for (_, sup) in std::mem::take(&mut self.running) {
            sup.quiet.cancel();
        }
        self.sync_view(held);
    }

    /// Tells the figures task which supervised slices this node holds.
    fn sync_view(&self, held: &Held) {
        let mut view = SupervisedView::new();
        for id in self.running.keys() {
            if let Some(h) = held.get(id) {
                view.entry(id.queue.clone()).or_insert_with(|| QueueSlices { slices_total: h.slices_total, slices: Default::default() }).slices.insert(id.slice);
            }
        }
        *self.view.lock().expect("supervised view") = view;
    }
}
