//! The runner's top level: state-dir lock, etcd connection, incarnations, shutdown.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use qslice_proto::keys::Keys;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::handler::Handler;
use crate::incarnation::{run_incarnation, Exit};
use crate::leash::{Leash, RENEW_EVERY as LEASH_RENEW};
use crate::mailman3::{install_script, ForkServers, Starts, WarmPool};
use crate::membership::register;
use crate::shared::Shared;
use crate::supervise::Flavour;
use qslice_common::etcd::{connect_when_ready, EtcdError, REQUEST_TIMEOUT};
use qslice_common::lease::{fence_margin, keep_alive, Incarnation, Role};
use qslice_common::retry::{until_ok, Backoff, STARTUP_BACKOFF};

/// Why the runner stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The state directory could not be prepared.
    #[error("cannot use state dir {dir}: {source}")]
    StateDir {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Another live runner holds the state dir's lock.
    #[error("another qslice-runner holds {lock}; each runner needs its own state_dir")]
    StateDirLocked {
        /// The lock file.
        lock: PathBuf,
    },
    /// Reaching etcd failed for good (bad TLS files) or was cancelled.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The cluster name is invalid.
    #[error("cluster: {0}")]
    Cluster(#[from] qslice_proto::keys::NameError),
    /// The leash process could not be started.
    #[error("cannot start the leash process (it binds child processes to the fence deadline): {0}")]
    Leash(#[source] std::io::Error),
}

/// The state dir's lock, held for the life of the process. The kernel releases it when
/// the process dies, however it dies: holding it proves that no predecessor runs.
pub struct StateLock {
    _lock: Flock<File>,
    lease_file: PathBuf,
}

impl StateLock {
    /// Takes the lock of `dir`, creating the directory.
    pub fn acquire(dir: &Path) -> Result<StateLock, DaemonError> {
        let err = |source| DaemonError::StateDir { dir: dir.to_owned(), source };
        std::fs::create_dir_all(dir).map_err(err)?;
        let path = dir.join("runner.lock");
        let file = File::options().create(true).truncate(false).write(true).open(&path).map_err(err)?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|_| DaemonError::StateDirLocked { lock: path })?;
        Ok(StateLock { _lock: lock, lease_file: dir.join("lease") })
    }

    /// The lease id a predecessor left, if any.
    pub fn previous_lease(&self) -> Option<i64> {
        std::fs::read_to_string(&self.lease_file).ok()?.trim().parse().ok()
    }

    fn record_lease(&self, lease: Option<i64>) {
        let result = match lease {
            Some(id) => File::create(&self.lease_file).and_then(|mut f| writeln!(f, "{id}").and_then(|()| f.sync_all())),
            None => std::fs::remove_file(&self.lease_file).or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) }),
        };
        if let Err(e) = result {
            tracing::warn!(file = %self.lease_file.display(), error = %e, "cannot record the lease id; a fast restart will wait for the TTL instead");
        }
    }
}

/// Tells the leash the time left before the fence deadline until the fence trips (then
/// zero: the children go); a lost leash trips the fence.
///
/// The leash's deadline is the fence deadline plus half the fence margin: still that much
/// before etcd can expire the lease, and after this runner's own fence has tripped, so a
/// handler the leash kills is always seen as killed at the fence (its entry stays `.bak`
/// for recovery), never as a failed entry to preserve in `bad/`. A renewal told late (this
/// runner starved of CPU past the deadline the leash had) trips the fence
/// ([`qslice_common::lease::Fence::leashed_until`]): keepalives acknowledged meanwhile do
/// not make up for children the leash has killed.
async fn renew_leash(leash: Arc<Leash>, inc: Incarnation) {
    let grace = fence_margin(inc.ttl) / 2;
    let mut tick = tokio::time::interval(LEASH_RENEW);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = inc.fence.lost().cancelled() => break,
            _ = leash.lost().cancelled() => {
                inc.fence.trip("the leash process is gone: no child may outlive this runner's fence");
                break;
            }
        }
        let left = if inc.fence.is_valid() { inc.fence.deadline().saturating_duration_since(tokio::time::Instant::now()) + grace } else { Duration::ZERO };
        if let Some(until) = leash.renew(inc.lease_id, left) {
            inc.fence.leashed_until(until);
        }
    }
    leash.renew(inc.lease_id, Duration::ZERO);
}

/// Installs the Mailman 3 slice runner into the state dir and starts a warm pool for each
/// `mailman3` supervised queue, so that the spares initialise while the runner registers.
fn start_pools(cfg: &Config, shutdown: &CancellationToken) -> Result<BTreeMap<String, Arc<WarmPool>>, DaemonError> {
    let queues: Vec<_> = cfg.supervise.iter().filter(|(_, sup)| sup.flavour == Flavour::Mailman3).collect();
    if queues.is_empty() {
        return Ok(BTreeMap::new());
    }
    let script = install_script(&cfg.state_dir).map_err(|source| DaemonError::StateDir { dir: cfg.state_dir.clone(), source })?;
    let mut pools = BTreeMap::new();
    let starts = Starts::new(cfg.start_concurrency);
    let servers = ForkServers::default();
    for (queue, sup) in queues {
        let pool = WarmPool::new(queue, sup.clone(), script.clone(), &cfg.node_id, starts.clone(), servers.clone());
        pool.want(0);
        tokio::spawn(pool.clone().maintain(shutdown.child_token()));
        pools.insert(queue.clone(), pool);
    }
    Ok(pools)
}

/// Runs the runner until `shutdown` is cancelled. `ready` tells /readyz.
pub async fn run(cfg: Config, shutdown: CancellationToken, ready: Arc<AtomicBool>) -> Result<(), DaemonError> {
    let lock = StateLock::acquire(&cfg.state_dir)?;
    crate::spool_mount::log_spool_mount(&cfg.spool);
    let mut leash = Leash::start(&cfg.etcd).map_err(DaemonError::Leash)?;
    let keys = Keys::new(&cfg.cluster)?;
    let mut client = match connect_when_ready(&cfg.etcd, &shutdown).await {
        Ok(c) => c,
        Err(EtcdError::Cancelled) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if let Some(previous) = lock.previous_lease() {
        // The lock proves the previous process of this state dir is dead: its lease and
        // claims can go now instead of after the TTL.
        match tokio::time::timeout(REQUEST_TIMEOUT, client.lease_revoke(previous)).await {
            Ok(Ok(_)) => tracing::info!(lease = previous, "revoked the lease of this node's previous process; its slices are free now"),
            Ok(Err(e)) => tracing::debug!(lease = previous, error = %e, "previous lease already gone"),
            Err(_) => tracing::warn!(lease = previous, "revoking the previous lease timed out; it ends with its TTL"),
        }
        lock.record_lease(None);
    }
    let pools = start_pools(&cfg, &shutdown)?;
    let shared = Arc::new(Shared { keys: keys.clone(), handler: Handler::new(cfg.handler.clone()), permits: Arc::new(Semaphore::new(cfg.concurrency)), pools, cfg });
    let mut backoff = Backoff::new(STARTUP_BACKOFF);
    loop {
        let Some(inc) = until_ok("registration failed", &mut backoff, &shutdown, async || register(&mut client, &keys, &shared.cfg).await).await else {
            return Ok(());
        };
        lock.record_lease(Some(inc.lease_id));
        tracing::info!(node = %shared.cfg.node_id, lease = inc.lease_id, incarnation = %inc.incarnation, ttl = ?inc.ttl, "registered");
        let keeper = {
            let client = client.clone();
            let inc_ref = inc.clone();
            tokio::spawn(async move { keep_alive(client, &inc_ref, Role::Runner).await })
        };
        if leash.lost().is_cancelled() {
            tracing::warn!("the leash was lost; starting a new one");
            leash = Leash::start(&shared.cfg.etcd).map_err(DaemonError::Leash)?;
        }
        let renewer = tokio::spawn(renew_leash(leash.clone(), inc.clone()));
        let exit = run_incarnation(client.clone(), shared.clone(), &inc, &shutdown, &ready).await;
        match exit {
            Exit::Shutdown => {
                inc.fence.trip("shutting down");
                keeper.abort();
                renewer.abort();
                match tokio::time::timeout(REQUEST_TIMEOUT, client.lease_revoke(inc.lease_id)).await {
                    Ok(Ok(_)) => {
                        lock.record_lease(None);
                        tracing::info!(lease = inc.lease_id, "released every slice and revoked the lease; bye");
                        leash.bye();
                    }
                    _ => tracing::warn!(lease = inc.lease_id, "revoking the lease failed; it ends with its TTL"),
                }
                return Ok(());
            }
            Exit::Fenced => {
                keeper.abort();
                renewer.abort();
                leash.renew(inc.lease_id, Duration::ZERO);
                tracing::error!(
                    lease = inc.lease_id,
                    reason = %inc.fence.reason().unwrap_or_default(),
                    "fenced: stopped all work on every slice; re-registering as a new incarnation once etcd answers"
                );
                // The old lease may still be alive in etcd (a pause, a partition): end it
                // so its claims go now. Failure is fine: it expires by itself.
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, client.lease_revoke(inc.lease_id)).await;
                client = match connect_when_ready(&shared.cfg.etcd, &shutdown).await {
                    Ok(c) => c,
                    Err(EtcdError::Cancelled) => return Ok(()),
                    Err(e) => return Err(e.into()),
                };
            }
        }
    }
}
