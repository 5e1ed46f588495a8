//! Talking to etcd: connecting with keepalive and timeouts, waiting for etcd with backoff,
//! and a list-then-watch stream of one key prefix.

use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, KeyValue, TlsOptions, WatchOptions};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::EtcdConfig;

/// Time limit of one etcd request. Calls without one hang forever on a frozen etcd.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// An etcd operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// Reading a TLS file failed.
    #[error("cannot read etcd TLS file {path}: {source}")]
    ReadTlsFile {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The client could not be built.
    #[error("cannot set up etcd client for {endpoints:?}: {source}")]
    Connect {
        /// The endpoints.
        endpoints: Vec<String>,
        /// The cause.
        #[source]
        source: etcd_client::Error,
    },
    /// Shutdown was requested while waiting for etcd.
    #[error("stopped while waiting for etcd")]
    Cancelled,
}

/// Builds the connection options: HTTP/2 keepalive (so a dead etcd is noticed), request
/// and connect timeouts, optional user/password and TLS.
pub fn connect_options(cfg: &EtcdConfig) -> Result<ConnectOptions, EtcdError> {
    Ok(options_without_request_timeout(cfg)?.with_timeout(REQUEST_TIMEOUT))
}

/// [`connect_options`] without the request timeout, for calls that wait by design (an
/// election campaign blocks until this instance leads, for hours maybe): HTTP/2 keepalive
/// still notices a dead etcd.
pub fn options_without_request_timeout(cfg: &EtcdConfig) -> Result<ConnectOptions, EtcdError> {
    let read = |path: &std::path::Path| std::fs::read(path).map_err(|source| EtcdError::ReadTlsFile { path: path.to_owned(), source });
    let mut options = ConnectOptions::new()
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true)
        .with_connect_timeout(REQUEST_TIMEOUT)
        .with_require_leader(true);
    if let (Some(user), Some(password)) = (&cfg.user, &cfg.password) {
        options = options.with_user(user.clone(), password.clone());
    }
    if cfg.ca.is_some() || cfg.cert.is_some() {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &cfg.ca {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(tls);
    }
    Ok(options)
}

/// Connects to etcd and waits until it answers a request, retrying with backoff (up to
/// 5 s between tries) and logging every few seconds while it is unreachable.
/// `Client::connect` alone succeeds against a dead endpoint, hence the explicit check.
pub async fn connect_when_ready(cfg: &EtcdConfig, cancel: &CancellationToken) -> Result<Client, EtcdError> {
    let options = connect_options(cfg)?;
    let started = Instant::now();
    let mut backoff = Duration::from_millis(100);
    let mut last_log = None::<Instant>;
    loop {
        let attempt = async {
            let mut client = Client::connect(cfg.endpoints.clone(), Some(options.clone())).await?;
            let status = client.status().await?;
            Ok::<_, etcd_client::Error>((client, status.version().to_owned()))
        };
        let error = match tokio::time::timeout(REQUEST_TIMEOUT * 2, attempt).await {
            Ok(Ok((client, version))) => {
                if let Some(warning) = version_warning(&version) {
                    tracing::warn!(endpoints = ?cfg.endpoints, etcd_version = %version, "{warning}");
                }
                if last_log.is_some() {
                    tracing::info!(endpoints = ?cfg.endpoints, waited = ?started.elapsed(), "etcd is reachable again");
                }
                return Ok(client);
            }
            Ok(Err(e)) => error_chain(&e),
            Err(_) => "no answer within the request timeout".to_owned(),
        };
        if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            tracing::warn!(endpoints = ?cfg.endpoints, waited = ?started.elapsed(), %error, "etcd is unreachable; retrying");
            last_log = Some(Instant::now());
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(EtcdError::Cancelled),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The first etcd releases whose leader, stuck on a slow disk, no longer revokes leases
/// before their TTL (etcd-io/etcd#15247, fixed in 3.4.31 and 3.5.13).
pub const SAFE_ETCD_VERSIONS: [(u64, u64, u64); 2] = [(3, 4, 31), (3, 5, 13)];

/// A warning for an etcd server `version` ("3.4.23") that can expire leases early, or
/// `None` for a safe one (3.4.31+, 3.5.13+, 3.6 and later) or one that does not parse.
pub fn version_warning(version: &str) -> Option<String> {
    let mut parts = version.trim().trim_start_matches('v').split(['.', '-', '+']).map(|p| p.parse::<u64>().ok());
    let (Some(Some(major)), Some(Some(minor)), Some(Some(patch))) = (parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    let old = match SAFE_ETCD_VERSIONS.iter().find(|(ma, mi, _)| (*ma, *mi) == (major, minor)) {
        Some((_, _, safe_patch)) => patch < *safe_patch,
        None => (major, minor) < (3, 4),
    };
    old.then(|| {
        format!(
            "etcd {version} is older than 3.4.31 / 3.5.13: a leader stuck on a slow disk can revoke leases before their TTL, \
             so a live runner can lose its slices (and fence) early; upgrade etcd (docs/OPERATIONS.md, \"etcd versions\")"
        )
    })
}

/// An error with all its causes on one line, for logs and messages: transport errors hide
/// the useful part (a TLS certificate problem, a refused connection) in their sources.
pub fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// An etcd request's error with all its causes ([`causes`]); a certificate that does not
/// chain to the configured CA is named as such.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = causes(e);
    if text.contains("UnknownIssuer") || text.contains("unknown issuer") {
        text.push_str(" (etcd's certificate is not signed by the CA given as etcd.ca / --etcd-ca)");
    }
    text
}

/// What a [`PrefixWatch`] yields.
#[derive(Debug)]
pub enum PrefixUpdate {
    /// The full current contents of the prefix (after the first list and every re-list).
    Snapshot(Vec<KeyValue>),
    /// A key was written.
    Put(KeyValue),
    /// A key was deleted (the value is empty).
    Delete(KeyValue),
}

/// The state of a [`PrefixWatch`]: list, then watch from the list's revision + 1; a
/// compacted revision, a cancelled watch or a broken stream sends it back to list.
enum WatchState {
    List,
    Watching(Box<etcd_client::WatchStream>),
}

/// A list-then-watch stream of one key prefix, in the manner of a Kubernetes reflector.
pub struct PrefixWatch {
    client: Client,
    prefix: String,
    state: WatchState,
    pending: std::collections::VecDeque<PrefixUpdate>,
    failures: u32,
}

impl PrefixWatch {
    /// Watches `prefix`; the first update is a snapshot.
    pub fn new(client: Client, prefix: String) -> PrefixWatch {
        PrefixWatch { client, prefix, state: WatchState::List, pending: Default::default(), failures: 0 }
    }

    /// The next update. Errors are logged and retried with backoff, never returned, so
    /// a caller only sees snapshots and events.
    pub async fn next(&mut self) -> PrefixUpdate {
        loop {
            if let Some(update) = self.pending.pop_front() {
                return update;
            }
            match &mut self.state {
                WatchState::List => match self.list_and_watch().await {
                    Ok((snapshot, stream)) => {
                        self.failures = 0;
                        self.state = WatchState::Watching(Box::new(stream));
                        return PrefixUpdate::Snapshot(snapshot);
                    }
                    Err(e) => self.back_off("list", &e.to_string()).await,
                },
                WatchState::Watching(stream) => match stream.message().await {
                    Ok(Some(resp)) => {
                        if resp.canceled() || resp.compact_revision() > 0 {
                            let reason = format!("watch cancelled (compact revision {}): {}", resp.compact_revision(), resp.cancel_reason());
                            self.state = WatchState::List;
                            self.back_off("watch", &reason).await;
                            continue;
                        }
                        for event in resp.events() {
                            let Some(kv) = event.kv() else { continue };
                            self.pending.push_back(match event.event_type() {
                                EventType::Put => PrefixUpdate::Put(kv.clone()),
                                EventType::Delete => PrefixUpdate::Delete(kv.clone()),
                            });
                        }
                    }
                    Ok(None) => {
                        self.state = WatchState::List;
                        self.back_off("watch", "stream ended").await;
                    }
                    Err(e) => {
                        self.state = WatchState::List;
                        self.back_off("watch", &e.to_string()).await;
                    }
                },
            }
        }
    }

    async fn list_and_watch(&mut self) -> Result<(Vec<KeyValue>, etcd_client::WatchStream), etcd_client::Error> {
        let resp = self.client.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix())).await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
        let stream = self.client.watch(self.prefix.as_str(), Some(options)).await?;
        Ok((resp.kvs().to_vec(), stream))
    }

    async fn back_off(&mut self, what: &str, error: &str) {
        self.failures += 1;
        let delay = Duration::from_millis(100 * 2u64.pow(self.failures.min(5))).min(Duration::from_secs(3));
        if self.failures == 1 || self.failures.is_multiple_of(10) {
            tracing::warn!(prefix = %self.prefix, %error, retry_in = ?delay, "{what} of etcd prefix failed; re-listing");
        }
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_that_revoke_leases_early_are_warned_about_and_others_are_not() {
        for old in ["3.4.23", "3.4.30", "3.5.0", "3.5.12", "3.3.27", "v3.4.1"] {
            let warning = version_warning(old).unwrap_or_else(|| panic!("{old} should warn"));
            assert!(warning.contains(old) && warning.contains("3.4.31"), "{warning}");
        }
        for safe in ["3.4.31", "3.4.35", "3.5.13", "3.5.21", "3.6.0", "4.0.0", "3.5.13-rc.0", "garbage", ""] {
            assert_eq!(version_warning(safe), None, "{safe}");
        }
    }
}
