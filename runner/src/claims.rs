//! The claim protocol in etcd. A claim key is created only if absent and hangs on the
//! claimer's lease; its create revision is the slice's epoch. A release deletes the claim
//! only if its create revision is still the epoch this holder got, so a holder never
//! deletes a later owner's claim.
//!
//! The transactions are public so that other programs (the scale benchmark) claim and
//! release exactly as the runner does.

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use qslice_common::etcd::REQUEST_TIMEOUT;
use qslice_proto::keys::Keys;
use qslice_proto::records::{Claim, Record};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ownership::SliceId;

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

/// What a claim attempt found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The claim is ours; its create revision is the slice's epoch.
    Claimed {
        /// The new epoch.
        epoch: i64,
    },
    /// Another holder still has the slice.
    HeldByOther {
        /// The store's revision when the claim was refused (watch its deletion after it).
        revision: i64,
    },
}

/// The transaction that creates `queue`'s `slice` claim with `record`, attached to `lease_id`, only if no claim exists.
pub fn claim_txn(keys: &Keys, queue: &str, slice: u32, record: &Claim, lease_id: i64) -> Txn {
    let key = keys.claim(queue, slice);
    Txn::new()
        .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key.as_str(), record.encode(), Some(PutOptions::new().with_lease(lease_id)))])
}

/// The transaction that deletes `queue`'s `slice` claim only if it is still the claim of epoch `epoch`.
pub fn release_txn(keys: &Keys, queue: &str, slice: u32, epoch: i64) -> Txn {
    let key = keys.claim(queue, slice);
    Txn::new()
        .when([Compare::create_revision(key.as_str(), CompareOp::Equal, epoch)])
        .and_then([TxnOp::delete(key.as_str(), None)])
}

/// Runs [`claim_txn`] within [`REQUEST_TIMEOUT`]: the epoch if the claim is ours, else the revision another holder's claim was seen at.
pub async fn claim_slice(client: &mut Client, keys: &Keys, queue: &str, slice: u32, record: &Claim, lease_id: i64) -> Result<ClaimOutcome, Error> {
    let failed = |source| Error::ClaimSlice { queue: queue.to_owned(), slice, source };
    let resp = match tokio::time::timeout(REQUEST_TIMEOUT, client.txn(claim_txn(keys, queue, slice, record, lease_id))).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => return Err(failed(e.into())),
        Err(_) => return Err(failed(RequestError::TimedOut(REQUEST_TIMEOUT))),
    };
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    Ok(if resp.succeeded() { ClaimOutcome::Claimed { epoch: revision } } else { ClaimOutcome::HeldByOther { revision } })
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

/// Tells `freed` once the claim `key` is deleted after `revision`; ends quietly when
/// cancelled or when the watch fails (the claim retry tick covers that).
pub(crate) async fn watch_release(mut client: Client, key: String, revision: i64, cancel: CancellationToken, freed: mpsc::UnboundedSender<SliceId>, slice: SliceId) {
    let deleted = async {
        let options = etcd_client::WatchOptions::new().with_start_revision(revision + 1);
        let mut stream = client.watch(key.as_str(), Some(options)).await.ok()?;
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
