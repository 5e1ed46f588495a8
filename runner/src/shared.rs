//! What every part of an incarnation shares: the room of its own that the watch loop,
//! the processor, the supervised slices, the singletons and the figures all read from,
//! below each of them.

use std::collections::BTreeMap;
use std::sync::Arc;

use qslice_proto::keys::Keys;
use tokio::sync::Semaphore;

use crate::config::Config;
use crate::handler::Handler;
use crate::mailman3::WarmPool;

/// What every part of the runner shares.
pub struct Shared {
    /// The configuration.
    pub cfg: Config,
    /// The cluster's keys.
    pub keys: Keys,
    /// The handler.
    pub handler: Handler,
    /// Bounds the entries in flight on this node.
    pub permits: Arc<Semaphore>,
    /// Warm Mailman 3 slice runners, per `mailman3` supervised queue.
    pub pools: BTreeMap<String, Arc<WarmPool>>,
}
