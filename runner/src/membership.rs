//! Membership: the node record attached to this incarnation's lease. The lease itself,
//! its keepalive and the fence are [`qslice_common::lease`].

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use qslice_common::lease::{grant_lease, timed, unix_ms, Incarnation, LeaseError};
use qslice_proto::keys::Keys;
use qslice_proto::records::{NodeRecord, Record, RECORD_VERSION};

use crate::config::Config;

/// Why membership could not be established.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// The lease could not be granted, or etcd did not answer in time.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// Writing the node record failed.
    #[error("cannot write node record {key}: {source}")]
    WriteNodeRecord {
        /// The key.
        key: String,
        /// The cause.
        #[source]
        source: etcd_client::Error,
    },
    /// Another live runner is registered with this node id.
    #[error("node id {node_id} is registered by another runner (host {host}, pid {pid}); waiting for its lease to end. Give each runner its own node_id")]
    NodeIdTaken {
        /// The node id.
        node_id: String,
        /// The other runner's host.
        host: String,
        /// The other runner's pid.
        pid: u32,
    },
}

/// Grants a lease and writes the node record attached to it (only if no other live
/// runner holds the node id).
pub async fn register(client: &mut Client, keys: &Keys, cfg: &Config) -> Result<Incarnation, MembershipError> {
    let mut inc = grant_lease(client, cfg.lease_ttl).await?;
    let record = NodeRecord {
        v: RECORD_VERSION,
        node_id: cfg.node_id.clone(),
        host: hostname::get().ok().and_then(|h| h.into_string().ok()).unwrap_or_default(),
        pid: std::process::id(),
        incarnation: inc.incarnation,
        weight: cfg.weight,
        queues: cfg.queues.clone(),
        version: qslice_proto::VERSION.to_owned(),
        started_unix_ms: unix_ms(),
        metrics_addr: cfg.metrics_addr.map(|a| a.to_string()),
        lease_id: inc.lease_id,
        refused_queues: Vec::new(),
    };
    let key = keys.node(&cfg.node_id);
    let txn = Txn::new()
        .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key.as_str(), record.encode(), Some(PutOptions::new().with_lease(inc.lease_id)))])
        .or_else([TxnOp::get(key.as_str(), None)]);
    let write_err = |source| MembershipError::WriteNodeRecord { key: key.clone(), source };
    let resp = match timed("node record write", client.txn(txn)).await {
        Ok(r) => r.map_err(write_err)?,
        Err(e) => {
            let _ = client.lease_revoke(inc.lease_id).await;
            return Err(e.into());
        }
    };
    if !resp.succeeded() {
        let _ = timed("lease revoke", client.lease_revoke(inc.lease_id)).await;
        let other = resp.op_responses().into_iter().find_map(|op| match op {
            etcd_client::TxnOpResponse::Get(g) => g.kvs().first().and_then(|kv| NodeRecord::decode(kv.value()).ok()),
            _ => None,
        });
        return Err(MembershipError::NodeIdTaken {
            node_id: cfg.node_id.clone(),
            host: other.as_ref().map(|o| o.host.clone()).unwrap_or_else(|| "unknown".into()),
            pid: other.map(|o| o.pid).unwrap_or(0),
        });
    }
    inc.record = Some(record);
    Ok(inc)
}
