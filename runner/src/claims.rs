//! The claim protocol in etcd. A claim key is created only if absent and hangs on the
//! claimer's lease; its create revision is the slice's epoch. A release deletes the claim
//! only if its create revision is still the epoch this holder got, so a holder never
//! deletes a later owner's claim.
//!
//! The transactions are public so that other programs (the scale benchmark) claim and
//! release exactly as the runner does.

use etcd_client::{Client, Compare, CompareOp, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse};
use qslice_common::etcd::REQUEST_TIMEOUT;
use qslice_common::lease::Fence;
use qslice_proto::keys::Keys;
use qslice_proto::records::{Claim, Record};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ownership::SliceId;
use crate::retry::{Backoff, RELEASE_BACKOFF};

/// A claim or release that did not go through.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The claim transaction failed or got no answer in time.
    #[error("claiming slice {slice} of {queue}")]
    ClaimSlice {
        /// The queue.
        queue: String,
        /// The slice.
        slice: u32,
        /// What the request ran into.
        #[source]
        source: RequestError,
    },
    /// The release transaction (the claim's delete) failed or got no answer in time.
    #[error("releasing slice {slice} of {queue}")]
    ReleaseSlice {
        /// The queue.
        queue: String,
        /// The slice.
        slice: u32,
        /// What the request ran into.
        #[source]
        source: RequestError,
    },
}

impl Error {
    /// What the request ran into (as logged: the error without the operation).
    pub fn cause(&self) -> &RequestError {
        match self {
            Error::ClaimSlice { source, .. } | Error::ReleaseSlice { source, .. } => source,
        }
    }
}

/// What an etcd request of the claim protocol ran into.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// etcd answered with an error.
    #[error(transparent)]
    Etcd(#[from] etcd_client::Error),
    /// etcd did not answer within [`REQUEST_TIMEOUT`].
    #[error("no answer within {0:?}")]
    TimedOut(std::time::Duration),
}

/// The queue configuration a claim is made under, compared by the claim transaction: a
/// claim made under a slice count the queue no longer has fails (the reslice barrier).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueRevision {
    /// The queue has no configuration record (its key's create revision must be 0).
    Absent,
    /// The queue's configuration record as last read: its key's mod revision.
    At(i64),
}

/// What a claim attempt found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The claim is ours; its create revision is the slice's epoch.
    Claimed {
        /// The new epoch.
        epoch: i64,
    },
    /// The claim exists on this lease already: an earlier claim committed though its
    /// answer was lost (etcd: a request that timed out may still have committed). It is
    /// ours, made under `slices_total`.
    Adopted {
        /// The claim's create revision: the slice's epoch.
        epoch: i64,
        /// The slice count written in the claim.
        slices_total: u32,
    },
    /// Another holder still has the slice.
    HeldByOther {
        /// The store's revision when the claim was refused (watch its deletion after it).
        revision: i64,
    },
    /// The slice is free but held back: the leader revoked its last holder's lease, and
    /// nobody claims it until that holder's fence has surely expired (the hold's key is
    /// deleted with the leader's lease, after the revoked lease's TTL).
    Held {
        /// The store's revision when the claim was refused (watch the hold's deletion).
        revision: i64,
    },
    /// The slice is free but the queue's configuration changed since it was read (a
    /// reslice): not claimed; claim again under the configuration now in force.
    QueueChanged {
        /// The store's revision when the claim was refused.
        revision: i64,
    },
}

/// The transaction that creates `queue`'s `slice` claim with `record`, attached to
/// `lease_id`, only if no claim exists, no hold holds the slice back and the queue's
/// configuration is still the one read at `queue_revision`. When it fails, its responses
/// are the claim (if any), the queue's record (if any) and the hold (if any), in that
/// order.
pub fn claim_txn(keys: &Keys, queue: &str, slice: u32, record: &Claim, lease_id: i64, queue_revision: QueueRevision) -> Txn {
    let key = keys.claim(queue, slice);
    let queue_key = keys.queue(queue);
    let hold_key = keys.hold(queue, slice);
    let barrier = match queue_revision {
        QueueRevision::Absent => Compare::create_revision(queue_key.as_str(), CompareOp::Equal, 0),
        QueueRevision::At(revision) => Compare::mod_revision(queue_key.as_str(), CompareOp::Equal, revision),
    };
    Txn::new()
        .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0), barrier, Compare::create_revision(hold_key.as_str(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key.as_str(), record.encode(), Some(PutOptions::new().with_lease(lease_id)))])
        .or_else([TxnOp::get(key.as_str(), None), TxnOp::get(queue_key.as_str(), None), TxnOp::get(hold_key.as_str(), None)])
}

/// The transaction that deletes `queue`'s `slice` claim only if it is still the claim of epoch `epoch`.
pub fn release_txn(keys: &Keys, queue: &str, slice: u32, epoch: i64) -> Txn {
    let key = keys.claim(queue, slice);
    Txn::new().when([Compare::create_revision(key.as_str(), CompareOp::Equal, epoch)]).and_then([TxnOp::delete(key.as_str(), None)])
}

/// A claim found on this incarnation's lease, adopted: this incarnation wrote it, with its
/// record; an unreadable one counts as made under no count, so that it is released.
fn adopted(kv: &KeyValue) -> ClaimOutcome {
    let slices_total = Claim::decode(kv.value()).map(|c| c.slices_total).unwrap_or(0);
    ClaimOutcome::Adopted { epoch: kv.create_revision(), slices_total }
}

/// Runs [`claim_txn`] within [`REQUEST_TIMEOUT`]: the epoch if the claim is ours (new,
/// or adopted: already on `lease_id`), else why not. A request that failed or timed out
/// may have committed: the claim is read back and adopted if it is on `lease_id`.
pub async fn claim_slice(client: &mut Client, keys: &Keys, queue: &str, slice: u32, record: &Claim, lease_id: i64, queue_revision: QueueRevision) -> Result<ClaimOutcome, Error> {
    let txn = claim_txn(keys, queue, slice, record, lease_id, queue_revision);
    let answer = create_on_lease(client, txn, &keys.claim(queue, slice), lease_id).await.map_err(|source| Error::ClaimSlice { queue: queue.to_owned(), slice, source })?;
    Ok(match answer {
        LeaseCreate::Created { revision } => ClaimOutcome::Claimed { epoch: revision },
        LeaseCreate::Ours(kv) => adopted(&kv),
        LeaseCreate::Refused { revision, found } => {
            let (claim, hold) = (found.first().cloned().flatten(), found.get(2).cloned().flatten());
            match (claim, hold) {
                (Some(kv), _) if kv.lease() == lease_id => adopted(&kv),
                (Some(_), _) => ClaimOutcome::HeldByOther { revision },
                (None, Some(_)) => ClaimOutcome::Held { revision },
                (None, None) => ClaimOutcome::QueueChanged { revision },
            }
        }
    })
}

/// What a create-if-absent transaction on a lease came to ([`create_on_lease`]).
pub(crate) enum LeaseCreate {
    /// It committed at `revision`: the key is ours, created then.
    Created {
        /// The store's revision of the commit (the key's create revision).
        revision: i64,
    },
    /// It failed or got no answer, but the key is on our lease: an earlier try (or this
    /// one, its answer lost) created it. The key as read back.
    Ours(KeyValue),
    /// Its compares failed: what its `or_else` gets found, in order ([`gets_of_failed`]).
    Refused {
        /// The store's revision when it was refused.
        revision: i64,
        /// Each get's key, `None` for a key that does not exist.
        found: Vec<Option<KeyValue>>,
    },
}

/// Runs `txn`, which creates `key` on `lease_id` only if absent (the claim protocol of
/// slices and singletons alike), within [`REQUEST_TIMEOUT`]. A request that failed or got
/// no answer may have committed: `key` is read back, and is ours if it is on `lease_id`;
/// if it is not (or etcd does not answer that either) the request's error is returned,
/// and the next try reads it again.
pub(crate) async fn create_on_lease(client: &mut Client, txn: Txn, key: &str, lease_id: i64) -> Result<LeaseCreate, RequestError> {
    let error = match tokio::time::timeout(REQUEST_TIMEOUT, client.txn(txn)).await {
        Ok(Ok(resp)) => {
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            if resp.succeeded() {
                return Ok(LeaseCreate::Created { revision });
            }
            return Ok(LeaseCreate::Refused { revision, found: gets_of_failed(resp) });
        }
        Ok(Err(e)) => RequestError::Etcd(e),
        Err(_) => RequestError::TimedOut(REQUEST_TIMEOUT),
    };
    let read = tokio::time::timeout(REQUEST_TIMEOUT, client.get(key, None)).await.ok().and_then(Result::ok);
    match read.and_then(|resp| resp.kvs().first().cloned()).filter(|kv| kv.lease() == lease_id) {
        Some(kv) => Ok(LeaseCreate::Ours(kv)),
        None => Err(error),
    }
}

/// What each get of a failed transaction's `or_else` found, in order (`None` for a key
/// that does not exist).
pub(crate) fn gets_of_failed(resp: TxnResponse) -> Vec<Option<KeyValue>> {
    resp.op_responses()
        .into_iter()
        .map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().first().cloned(),
            _ => None,
        })
        .collect()
}

/// Runs [`release_txn`] within [`REQUEST_TIMEOUT`]; a claim that is no longer ours is left alone and is no error.
pub async fn release_claim(client: &mut Client, keys: &Keys, queue: &str, slice: u32, epoch: i64) -> Result<(), Error> {
    let failed = |source| Error::ReleaseSlice { queue: queue.to_owned(), slice, source };
    match tokio::time::timeout(REQUEST_TIMEOUT, client.txn(release_txn(keys, queue, slice, epoch))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(failed(e.into())),
        // Logged as it always was, as etcd-client's own error.
        Err(_) => Err(failed(etcd_client::Error::InvalidArgs("delete claim timed out".into()).into())),
    }
}

/// Runs [`release_claim`] until it succeeds, waiting [`RELEASE_BACKOFF`] between tries,
/// for as long as `fence` is valid: a claim left behind would keep the slice from its
/// next owner for as long as this lease lives (until the revoke deadline of a move,
/// forever for a paused or resliced queue). The last error once the fence is no longer
/// valid (the lease, and with it the claim, is ending anyway).
pub async fn release_claim_retrying(client: &mut Client, keys: &Keys, queue: &str, slice: u32, epoch: i64, fence: &Fence) -> Result<(), Error> {
    let mut backoff = Backoff::new(RELEASE_BACKOFF);
    loop {
        let error = match release_claim(client, keys, queue, slice, epoch).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if !fence.is_valid() {
            return Err(error);
        }
        let delay = backoff.next_delay();
        tracing::warn!(%queue, slice, epoch, error = %error.cause(), retry_in = ?delay, "deleting the claim failed; retrying while the lease lasts");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = fence.lost().cancelled() => return Err(error),
        }
    }
}

/// Tells `freed` once the claim `key` is deleted (it was held by another at `revision`);
/// ends quietly when cancelled or when the watch fails (the claim retry tick covers that).
///
/// The watch starts at etcd's current revision, and the key is read once the watch is
/// created: a watch from an earlier revision (`revision + 1`, after other writes) is
/// "unsynced" in etcd and hears of the delete only at etcd's next catch-up of such
/// watches, up to 100 ms later; a delete before the watch was created is seen by the read.
pub(crate) async fn watch_release(mut client: Client, key: String, revision: i64, cancel: CancellationToken, freed: mpsc::UnboundedSender<SliceId>, slice: SliceId) {
    let deleted = async {
        let mut stream = client.watch(key.as_str(), None).await.ok()?;
        // The first answer says the watch is in place.
        let created = stream.message().await.ok()??;
        if created.events().iter().any(|e| e.event_type() == etcd_client::EventType::Delete) {
            return Some(());
        }
        let now = client.get(key.as_str(), None).await.ok()?;
        if now.kvs().is_empty() {
            return Some(());
        }
        tracing::trace!(%key, revision, "waiting for the claim's release");
        while let Ok(Some(resp)) = stream.message().await {
            if resp.events().iter().any(|e| e.event_type() == etcd_client::EventType::Delete) {
                return Some(());
            }
        }
        None
    };
    tokio::select! {
        d = deleted => if d.is_some() {
            let _ = freed.send(slice);
        },
        _ = cancel.cancelled() => {}
    }
}
