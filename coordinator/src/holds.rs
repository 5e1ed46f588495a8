//! The leader's revoke of a runner's lease, with the hold that keeps the revoked lease's
//! slices and singletons from every other node until the runner's fence has surely
//! expired.
//!
//! Why: etcd deletes a revoked lease's claims at once, and the node a slice is assigned
//! to would claim it within milliseconds; but the runner that held the lease believes its
//! fence valid until its own deadline (the send time of its last acknowledged keepalive +
//! TTL − margin), and a runner stuck in a slow call learns of the revoke only at its next
//! keepalive. Until then it may start entries of slices another node now holds.
//!
//! So before the revoke the leader writes a hold key for each of the lease's claims
//! (`holds/<queue>/<slice>`, `singleton-holds/<name>`) on a lease of its own granted with
//! the revoked lease's TTL, and renews that lease once after the revoke: the holds end at
//! least a TTL after the revoke, later than any deadline the runner can hold (every
//! keepalive it sent was sent before the revoke). Runners' claim transactions require
//! the hold key to be absent, and they watch it to claim the moment it goes. The holds
//! are in etcd, not in the leader, so a leader that fails over meanwhile loses nothing.

use qslice_common::lease::unix_ms;
use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions, Txn, TxnOp};
use qslice_common::etcd::REQUEST_TIMEOUT;
use qslice_proto::keys::{Key, Keys};
use qslice_proto::records::{Hold, Record, RECORD_VERSION};

/// Puts per transaction (etcd allows 128 operations).
const PUTS_PER_TXN: usize = 100;

/// Why a revoke did not happen, or happened without a full hold.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    /// An etcd call failed before the revoke: nothing was revoked; the next round tries
    /// again (a hold already written ends with its own lease).
    #[error("{what} failed before the revoke: {source}")]
    Before {
        /// The call.
        what: &'static str,
        /// etcd's error.
        source: etcd_client::Error,
    },
    /// An etcd call did not answer within the request timeout, before the revoke.
    #[error("{what} did not answer within {REQUEST_TIMEOUT:?}, before the revoke")]
    TimedOut {
        /// The call.
        what: &'static str,
    },
    /// The revoke itself failed or timed out; it may still take effect, and the holds
    /// written for it end a TTL after their grant.
    #[error("revoking the lease failed: {0}")]
    Revoke(String),
}

/// What a revoke did.
#[derive(Debug, PartialEq, Eq)]
pub enum Revoked {
    /// The lease was revoked; its slices and singletons are held for `hold`.
    Revoked {
        /// How long the holds last from the revoke (the revoked lease's TTL).
        hold: Duration,
        /// The slices held.
        slices: usize,
        /// The singletons held.
        singletons: usize,
    },
    /// The lease had already ended (expired, or revoked by its runner): nothing to do.
    AlreadyGone,
}

/// Runs `f` under the request timeout, naming it `what` in the error.
async fn timed<T>(what: &'static str, f: impl std::future::Future<Output = Result<T, etcd_client::Error>>) -> Result<T, RevokeError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(RevokeError::Before { what, source }),
        Err(_) => Err(RevokeError::TimedOut { what }),
    }
}

/// Revokes `node`'s lease `lease` after holding everything it holds (see the module
/// documentation). `reason` goes into the hold records.
pub async fn revoke_with_hold(client: &mut Client, keys: &Keys, node: &str, lease: i64, reason: &str) -> Result<Revoked, RevokeError> {
    let ttl = timed("reading the lease's TTL", client.lease_time_to_live(lease, None)).await?;
    if ttl.ttl() < 0 {
        return Ok(Revoked::AlreadyGone);
    }
    // The granted TTL is what the runner's fence counts from each keepalive it sends.
    let granted = ttl.granted_ttl().max(1);
    let hold_lease = timed("granting the hold's lease", client.lease_grant(granted, None)).await?.id();
    let singletons = timed("listing the singleton claims", client.get(keys.singletons_prefix(), Some(GetOptions::new().with_prefix()))).await?;
    let singleton_names: Vec<String> = singletons.kvs().iter().filter(|kv| kv.lease() == lease).filter_map(|kv| keys.parse_singleton(kv.key())).collect();
    // Read now, not from the leader's snapshot: a claim the runner made since is held too.
    let claims = timed("listing the claims", client.get(keys.claims_prefix(), Some(GetOptions::new().with_prefix().with_keys_only()))).await?;
    let slices: Vec<(String, u32)> = claims
        .kvs()
        .iter()
        .filter(|kv| kv.lease() == lease)
        .filter_map(|kv| match keys.parse(kv.key()) {
            Some(Key::Claim { queue, slice }) => Some((queue, slice)),
            _ => None,
        })
        .collect();
    let record = Hold { v: RECORD_VERSION, node_id: node.to_owned(), lease, reason: reason.to_owned(), since_unix_ms: unix_ms() }.encode();
    let options = PutOptions::new().with_lease(hold_lease);
    let mut puts: Vec<TxnOp> = slices.iter().map(|(q, s)| TxnOp::put(keys.hold(q, *s), record.clone(), Some(options.clone()))).collect();
    puts.extend(singleton_names.iter().map(|n| TxnOp::put(keys.singleton_hold(n), record.clone(), Some(options.clone()))));
    while !puts.is_empty() {
        let batch: Vec<TxnOp> = puts.drain(..puts.len().min(PUTS_PER_TXN)).collect();
        timed("writing the holds", client.txn(Txn::new().and_then(batch))).await?;
    }
    match tokio::time::timeout(REQUEST_TIMEOUT, client.lease_revoke(lease)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(RevokeError::Revoke(e.to_string())),
        Err(_) => return Err(RevokeError::Revoke(format!("no answer within {REQUEST_TIMEOUT:?}"))),
    }
    // Renewed once, the holds end a full TTL after the revoke, not after their grant.
    if let Err(e) = renew_once(client, hold_lease).await {
        tracing::warn!(%node, lease, error = %e, "renewing the hold after the revoke failed; it ends a TTL after its grant");
    }
    Ok(Revoked::Revoked { hold: Duration::from_secs(granted as u64), slices: slices.len(), singletons: singleton_names.len() })
}

/// One keepalive of `lease`, answered.
async fn renew_once(client: &mut Client, lease: i64) -> Result<(), RevokeError> {
    let (mut keeper, mut stream) = timed("renewing the hold", client.lease_keep_alive(lease)).await?;
    timed("renewing the hold", keeper.keep_alive()).await?;
    match timed("renewing the hold", stream.message()).await? {
        Some(reply) if reply.ttl() > 0 => Ok(()),
        _ => Err(RevokeError::TimedOut { what: "renewing the hold (no answer)" }),
    }
}
