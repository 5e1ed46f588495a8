//! The coordinator's HTTP endpoint (`--http-addr`): Prometheus `/metrics`, `/healthz`,
//! `/readyz`, and a live dashboard that needs nothing from outside the machine:
//!
//! - `/`: one self-contained HTML page (inline CSS and JavaScript) that polls
//!   `/api/status` every second and draws each queue's slices as a grid colored by owner,
//!   with unowned slices marked, depth and oldest-entry age per slice, slices with a
//!   message in flight for too long outlined, queues no node may take badged, and a timeline of
//!   failovers (how long each slice processed nothing, [`idle_time`]) and recent events.
//! - `/api/status`: the JSON the page draws: [`Admin::status`] with every slice, taken
//!   through the status rows qslicectl prints ([`crate::status_rows`]), plus the failovers
//!   and events this instance saw since it started ([`History`]).
//!
//! Any instance, leader or standby, serves the same picture: it comes from the instance's
//! own cluster cache. `/readyz` answers 200 only on the leader.
//!
//! Protections follow the admin API's ([`HttpProtection::of_admin`]): with a token and
//! `protect_reads`, `/api/status` answers 401 unless the request carries
//! `Authorization: Bearer <token>`; the page asks for the token and sends it on its
//! fetches (it holds no data itself, so it is served to anyone). With the admin API's TLS
//! certificate and key the whole endpoint is served over TLS only. `/metrics`, `/healthz`
//! and `/readyz` stay open to whoever reaches the address, for Prometheus and probes.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use qslice_common::health::{self, Readiness};
use qslice_proto::admin::event::Kind;
use qslice_proto::admin::{Event, GetStatusResponse};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast::error::RecvError;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::admin::Admin;
use crate::cache::{ClaimEnd, ClusterCache};
use crate::config::AdminConfig;
use crate::leader::LeaderState;
use crate::status_rows::{status_view, NodeRow, QueueRow, SliceRow, StatusView};
use qslice_common::lease::unix_ms;

/// Events kept for the timeline (newest win).
pub const KEEP_EVENTS: usize = 200;
/// Failovers and hand-offs kept for the timeline (newest win).
pub const KEEP_FAILOVERS: usize = 100;

/// How long a client may take over its TLS handshake before it is dropped (a stalled
/// client must not hold a task forever; a real handshake takes milliseconds).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the HTTP endpoint cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// A TLS certificate or key file cannot be read or parsed.
    #[error("cannot read the HTTP endpoint's TLS file {path}: {source}")]
    ReadTlsFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refuses the certificate and key.
    #[error("the HTTP endpoint's TLS certificate and key are not usable: {0}")]
    TlsConfig(#[source] rustls::Error),
    /// The address cannot be bound, or serving failed.
    #[error("cannot serve HTTP on {addr}: {source}")]
    Serve {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What guards the endpoint: the admin API's protections, applied to HTTP.
#[derive(Clone, Default)]
pub struct HttpProtection {
    /// The token `/api/status` needs (`Authorization: Bearer`); `None` leaves it open.
    pub read_token: Option<String>,
    /// PEM certificate chain and key: serve over TLS only.
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl HttpProtection {
    /// The admin API's protections: its token when it protects reads, its TLS files.
    /// (Client certificates, `client_ca`, guard the admin API only: browsers and
    /// Prometheus do not carry them, and the token guards the data.)
    pub fn of_admin(admin: &AdminConfig) -> HttpProtection {
        HttpProtection { read_token: admin.token.clone().filter(|_| admin.protect_reads), tls: admin.tls_cert.clone().zip(admin.tls_key.clone()) }
    }
}

/// The TLS configuration of certificate chain `cert` and key `key` (PEM files), HTTP/1.1.
pub fn tls_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, HttpError> {
    fn read_err(path: &Path) -> impl FnOnce(rustls::pki_types::pem::Error) -> HttpError + '_ {
        move |source| HttpError::ReadTlsFile { path: path.to_owned(), source }
    }
    let certs = CertificateDer::pem_file_iter(cert).map_err(read_err(cert))?.collect::<Result<Vec<_>, _>>().map_err(read_err(cert))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(read_err(key))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(HttpError::TlsConfig)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(HttpError::TlsConfig)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Connections that finished their TLS handshake, for `axum::serve`. A task accepts TCP
/// connections and shakes hands with each in a task of its own, so one slow client holds
/// up no other.
struct TlsListener {
    /// Handshaken connections.
    ready: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
    /// The bound address.
    local: SocketAddr,
}

impl TlsListener {
    fn start(tcp: TcpListener, acceptor: TlsAcceptor, shutdown: CancellationToken) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    a = tcp.accept() => a,
                };
                match accepted {
                    Ok((stream, peer)) => {
                        let (acceptor, tx) = (acceptor.clone(), tx.clone());
                        tokio::spawn(async move {
                            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                                Ok(Ok(tls)) => {
                                    let _ = tx.send((tls, peer)).await;
                                }
                                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake on the HTTP endpoint failed"),
                                Err(_) => tracing::debug!(%peer, "TLS handshake on the HTTP endpoint timed out"),
                            }
                        });
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!(error = %e, "accepting an HTTP connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(TlsListener { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept task stopped (shutdown): axum stops asking soon.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Whether `headers` carry `Authorization: Bearer <token>` (compared in constant time).
fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    let sent = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
    sent.is_some_and(|sent| constant_time_eq::constant_time_eq(sent.trim().as_bytes(), token.as_bytes()))
}

/// What the endpoint serves from; cheap to clone.
#[derive(Clone)]
pub struct Dashboard {
    inner: Arc<Inner>,
}

struct Inner {
    /// The admin API's state, set once etcd answers ([`Dashboard::attach`]); until then
    /// `/api/status` answers 503.
    admin: OnceLock<Arc<Admin>>,
    /// Whether this instance leads, for `/readyz`.
    leader: Arc<LeaderState>,
    /// The Prometheus recorder's handle, for `/metrics` (none if another recorder won).
    metrics: Option<PrometheusHandle>,
    /// Events and failovers seen since this instance started, fed by a task of `attach`.
    history: Mutex<History>,
    /// The token `/api/status` needs, if any.
    read_token: Option<String>,
}

impl Dashboard {
    /// A dashboard with no cluster attached yet; `/api/status` needs `read_token` if set.
    pub fn new(leader: Arc<LeaderState>, metrics: Option<PrometheusHandle>, read_token: Option<String>) -> Dashboard {
        Dashboard { inner: Arc::new(Inner { admin: OnceLock::new(), leader, metrics, history: Mutex::new(History::default()), read_token }) }
    }

    /// Attaches the admin API's state and records its events until `shutdown`; `cache`
    /// tells how each lost claim ended ([`ClusterCache::claim_end`]).
    pub fn attach(&self, admin: Arc<Admin>, cache: Arc<ClusterCache>, shutdown: CancellationToken) {
        let mut events = admin.events();
        if self.inner.admin.set(admin).is_err() {
            tracing::warn!("the dashboard is already attached to a cluster");
            return;
        }
        let inner = self.inner.clone();
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    e = events.recv() => e,
                };
                match event {
                    Ok(e) => {
                        let mut history = inner.history.lock().expect("history lock");
                        // The cache noted how the lost claim ended before it emitted its loss.
                        let end = match e.kind() {
                            Kind::SliceClaimed => history.lost_epoch(&e.queue, e.slice).and_then(|epoch| cache.claim_end(&(e.queue.clone(), e.slice), epoch)),
                            _ => None,
                        };
                        history.record_with(&e, end);
                    }
                    Err(RecvError::Lagged(n)) => tracing::warn!(missed = n, "the dashboard fell behind the event stream; its timeline misses events"),
                    Err(RecvError::Closed) => return,
                }
            }
        });
    }

    /// The routes: `/`, `/api/status`, `/metrics`, `/healthz`, `/readyz`.
    pub fn router(&self) -> Router {
        let leader = self.inner.leader.clone();
        let readiness: Readiness =
            Arc::new(move || if leader.leading.load(Ordering::SeqCst) { Ok("ready: leading\n") } else { Err("not ready: not the leader (standby or not yet elected)\n") });
        Router::new()
            .route("/", get(|| async { Html(PAGE) }))
            .route("/api/status", get(api_status))
            .with_state(self.clone())
            .merge(health::routes(self.inner.metrics.clone(), readiness))
    }

    /// Serves the routes on `addr` until `shutdown`: over TLS only when `tls` names a
    /// certificate chain and key, else plain HTTP.
    pub async fn serve(self, addr: SocketAddr, tls: Option<(PathBuf, PathBuf)>, shutdown: CancellationToken) -> Result<(), HttpError> {
        let what = if self.inner.read_token.is_some() {
            "the dashboard (/), /api/status (token required), /metrics, /healthz and /readyz"
        } else {
            "the dashboard (/), /api/status, /metrics, /healthz and /readyz"
        };
        let serve_err = |source| HttpError::Serve { addr, source };
        let Some((cert, key)) = tls else {
            return health::serve(addr, self.router(), what, shutdown).await.map_err(serve_err);
        };
        let acceptor = TlsAcceptor::from(Arc::new(tls_config(&cert, &key)?));
        let tcp = TcpListener::bind(addr).await.map_err(serve_err)?;
        let listener = TlsListener::start(tcp, acceptor, shutdown.clone()).map_err(serve_err)?;
        tracing::info!(%addr, "serving {what} over TLS (https)");
        axum::serve(listener, self.router()).with_graceful_shutdown(async move { shutdown.cancelled().await }).await.map_err(serve_err)
    }
}

async fn api_status(State(d): State<Dashboard>, headers: HeaderMap) -> Response {
    if let Some(token) = &d.inner.read_token {
        if !bearer_matches(&headers, token) {
            let error =
                if headers.contains_key(header::AUTHORIZATION) { "the bearer token is not accepted" } else { "this endpoint needs a bearer token (Authorization: Bearer <token>)" };
            let mut response = json(StatusCode::UNAUTHORIZED, &ErrorBody { error: error.into() });
            response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer realm=\"qslice\""));
            return response;
        }
    }
    let Some(admin) = d.inner.admin.get() else {
        return json(StatusCode::SERVICE_UNAVAILABLE, &ErrorBody { error: "this coordinator is not connected to etcd yet".into() });
    };
    match admin.status(true) {
        Ok(status) => {
            let history = d.inner.history.lock().expect("history lock").clone();
            json(StatusCode::OK, &StatusBody::new(&status, &history, unix_ms()))
        }
        Err(e) => json(StatusCode::SERVICE_UNAVAILABLE, &ErrorBody { error: e.to_string() }),
    }
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_string(body) {
        Ok(text) => (status, [(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode JSON: {e}\n")).into_response(),
    }
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

/// The JSON of `/api/status`.
#[derive(Clone, Debug, Serialize)]
pub struct StatusBody {
    /// The cluster name.
    pub cluster: String,
    /// The leading coordinator's id.
    pub leader: Option<String>,
    /// The other coordinators' ids.
    pub standbys: Vec<String>,
    /// Whether maintenance mode is on.
    pub maintenance: bool,
    /// Conditions that need an operator ([`crate::health::active_alerts`]).
    pub alerts: Vec<String>,
    /// Live runners, as `qslicectl status --json` has them.
    pub nodes: Vec<NodeRow>,
    /// Queues with one cell per slice.
    pub queues: Vec<QueueBody>,
    /// Failovers and hand-offs, newest first.
    pub failovers: Vec<Failover>,
    /// Recent events, newest first.
    pub events: Vec<EventRow>,
    /// Cluster-wide singleton commands and who runs them, by name.
    pub singletons: Vec<crate::status_rows::SingletonRow>,
    /// When this answer was made (ms since the Unix epoch).
    pub generated_unix_ms: i64,
}

/// One queue and its slices: the queue's status row, and its slices' rows as cells.
#[derive(Clone, Debug, Serialize)]
pub struct QueueBody {
    /// The queue's row, as `qslicectl queues --json` prints it.
    #[serde(flatten)]
    pub queue: QueueRow,
    /// One cell per slice, in slice order: the slice rows `qslicectl status --json` prints.
    pub cells: Vec<SliceRow>,
}

fn non_empty(s: String) -> Option<String> {
    if s.is_empty() {
        None
    } else {
        Some(s)
    }
}

impl StatusBody {
    /// The page's data from an admin status (with slices) and the recorded history.
    pub fn new(status: &GetStatusResponse, history: &History, now_ms: i64) -> StatusBody {
        StatusBody::from_rows(status_view(status, true), history, now_ms)
    }

    /// The page's data from the status rows qslicectl prints too ([`crate::status_rows`]):
    /// the same rows, fewer fields, and each queue's slices as its cells.
    pub fn from_rows(rows: StatusView, history: &History, now_ms: i64) -> StatusBody {
        let mut cells: BTreeMap<String, Vec<SliceRow>> = BTreeMap::new();
        for s in rows.slices.unwrap_or_default() {
            cells.entry(s.queue.clone()).or_default().push(s);
        }
        StatusBody {
            cluster: rows.cluster,
            leader: rows.leader.map(|l| l.id),
            standbys: rows.standbys.into_iter().map(|s| s.id).collect(),
            maintenance: rows.maintenance,
            alerts: rows.alerts,
            nodes: rows.nodes,
            queues: rows
                .queues
                .into_iter()
                .map(|queue| {
                    let mut c = cells.remove(&queue.name).unwrap_or_default();
                    c.sort_by_key(|c| c.slice);
                    QueueBody { queue, cells: c }
                })
                .collect(),
            failovers: history.failovers.iter().rev().cloned().collect(),
            events: history.events.iter().rev().cloned().collect(),
            singletons: rows.singletons,
            generated_unix_ms: now_ms,
        }
    }
}

/// One event as the timeline shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EventRow {
    /// When (ms since the Unix epoch).
    pub time_unix_ms: i64,
    /// The kind in lower case, e.g. `slice_orphaned`.
    pub kind: String,
    /// The node (or coordinator, for a leader change) it is about.
    pub node: Option<String>,
    /// The queue, for slice events.
    pub queue: Option<String>,
    /// The slice, for slice events.
    pub slice: Option<u32>,
    /// The claim epoch, where there is one.
    pub epoch: Option<i64>,
    /// Free text.
    pub message: Option<String>,
}

/// A slice that lost its owner and was claimed again.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Failover {
    /// The queue.
    pub queue: String,
    /// The slice.
    pub slice: u32,
    /// The owner that lost it.
    pub from: String,
    /// The node that claimed it.
    pub to: String,
    /// `failover` when the claim vanished under its owner (crash, fence), `handoff` when the
    /// owner released it (a planned move).
    pub cause: String,
    /// When the claim went (ms since the Unix epoch).
    pub lost_unix_ms: i64,
    /// When the new claim was made.
    pub claimed_unix_ms: i64,
    /// How long the slice had no owner.
    pub unowned_ms: i64,
    /// How long the slice processed nothing: from [`Failover::stopped_unix_ms`] to the new
    /// claim ([`idle_time`]).
    pub idle_ms: i64,
    /// When the slice stopped processing, as well as this instance can tell.
    pub stopped_unix_ms: i64,
    /// Where the idle time counts from: `last_keepalive` (the lease expired: its expiry
    /// minus its TTL), `lease_revoked` (the leader fenced the node), `release` (the owner
    /// deleted its claim) or `claim_deleted` (how it ended is unknown: the idle time is at least this).
    pub idle_from: String,
    /// The same in words, e.g. `lease expired; from last keepalive to new claim`.
    pub idle_basis: String,
    /// The old owner's lease TTL, when known.
    pub lease_ttl_ms: Option<i64>,
}

/// How long a failed-over slice processed nothing, and from when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Idle {
    /// When the slice stopped processing (ms since the Unix epoch).
    pub stopped_unix_ms: i64,
    /// From then to the new claim.
    pub idle_ms: i64,
    /// Where it counts from ([`Failover::idle_from`]).
    pub from: &'static str,
    /// The same in words.
    pub basis: &'static str,
}

/// The idle time of a slice whose claim went at `lost_ms` and came back at `claimed_ms`,
/// given how the claim ended (`end`, if this instance saw it) and whether the leader had
/// just fenced the old owner. A claim that went with its expired lease stopped being worked
/// no later than the lease's last keepalive (etcd expires a lease TTL after the last one
/// it got, checking about every 500 ms), so the count starts TTL before the claim went; a
/// claim released by its owner, or revoked by the leader, was worked until it went. The
/// runner's keepalive comes every TTL/3, so a node killed between two keepalives did work
/// up to TTL/3 past the start: the figure is an upper bound by that much, and a lower bound
/// when nothing is known of how the claim ended.
pub fn idle_time(lost_ms: i64, claimed_ms: i64, end: Option<&ClaimEnd>, fenced: bool) -> Idle {
    let (stopped, from, basis) = match end {
        Some(e) if e.lease_ended && fenced => (lost_ms, "lease_revoked", "lease revoked by the leader; from the revoke to new claim"),
        Some(ClaimEnd { lease_ended: true, lease_ttl_ms: Some(ttl), .. }) => (lost_ms - ttl, "last_keepalive", "lease expired; from last keepalive to new claim"),
        Some(e) if e.lease_ended => (lost_ms, "claim_deleted", "lease ended, TTL unknown; at least, from the claim's end to new claim"),
        Some(_) => (lost_ms, "release", "released by its owner; from the release to new claim"),
        None => (lost_ms, "claim_deleted", "how the claim ended is unknown; at least, from the claim's end to new claim"),
    };
    Idle { stopped_unix_ms: stopped, idle_ms: (claimed_ms - stopped).max(0), from, basis }
}

/// How close to a lost claim a fence of its holder must be to have caused it: the leader
/// emits `NODE_FENCED` right after its revoke returns, the cache sees the deletion about
/// as soon.
const FENCE_WINDOW_MS: i64 = 5_000;

/// What the timeline remembers: the last [`KEEP_EVENTS`] events and the last
/// [`KEEP_FAILOVERS`] failovers and hand-offs. Pure: fed one event at a time.
#[derive(Clone, Debug, Default)]
pub struct History {
    /// Oldest first.
    events: VecDeque<EventRow>,
    /// Oldest first.
    failovers: VecDeque<Failover>,
    /// Slices whose claim went and is not back yet: when, from whom, whether released, and
    /// the lost claim's epoch.
    lost: BTreeMap<(String, u32), (i64, String, &'static str, i64)>,
    /// When the leader last fenced each node (a `NODE_FENCED` event).
    fenced: BTreeMap<String, i64>,
}

impl History {
    /// Records one event, knowing nothing of how lost claims ended.
    pub fn record(&mut self, e: &Event) {
        self.record_with(e, None);
    }

    /// The epoch of the lost claim of `queue`/`slice`, while it is not claimed again.
    pub fn lost_epoch(&self, queue: &str, slice: u32) -> Option<i64> {
        self.lost.get(&(queue.to_owned(), slice)).map(|l| l.3)
    }

    /// Records one event; a claim that follows a lost claim of the same slice makes a
    /// failover, with `end` telling how the lost claim ended (for its idle time).
    pub fn record_with(&mut self, e: &Event, end: Option<ClaimEnd>) {
        let kind = e.kind();
        let is_alert = matches!(kind, Kind::Alert | Kind::AlertCleared) && !e.queue.is_empty();
        let is_slice = matches!(kind, Kind::SliceAssigned | Kind::SliceClaimed | Kind::SliceReleased | Kind::SliceOrphaned) || (is_alert && !e.whole_queue);
        push_capped(
            &mut self.events,
            EventRow {
                time_unix_ms: e.time_unix_ms,
                kind: kind.as_str_name().to_ascii_lowercase(),
                node: non_empty(e.node.clone()),
                queue: if is_slice || is_alert { non_empty(e.queue.clone()) } else { None },
                slice: if is_slice { Some(e.slice) } else { None },
                epoch: if e.epoch != 0 { Some(e.epoch) } else { None },
                message: non_empty(e.message.clone()),
            },
            KEEP_EVENTS,
        );
        let key = (e.queue.clone(), e.slice);
        match kind {
            Kind::SliceOrphaned => {
                self.lost.insert(key, (e.time_unix_ms, e.node.clone(), "failover", e.epoch));
            }
            Kind::SliceReleased => {
                self.lost.insert(key, (e.time_unix_ms, e.node.clone(), "handoff", e.epoch));
            }
            Kind::NodeFenced => {
                self.fenced.insert(e.node.clone(), e.time_unix_ms);
            }
            Kind::SliceClaimed => {
                if let Some((lost_at, from, cause, _)) = self.lost.remove(&key) {
                    let fenced = self.fenced.get(&from).is_some_and(|t| (t - lost_at).abs() <= FENCE_WINDOW_MS);
                    let idle = idle_time(lost_at, e.time_unix_ms, end.as_ref(), fenced);
                    let failover = Failover {
                        queue: key.0,
                        slice: key.1,
                        from,
                        to: e.node.clone(),
                        cause: cause.to_owned(),
                        lost_unix_ms: lost_at,
                        claimed_unix_ms: e.time_unix_ms,
                        unowned_ms: (e.time_unix_ms - lost_at).max(0),
                        idle_ms: idle.idle_ms,
                        stopped_unix_ms: idle.stopped_unix_ms,
                        idle_from: idle.from.to_owned(),
                        idle_basis: idle.basis.to_owned(),
                        lease_ttl_ms: end.and_then(|e| e.lease_ttl_ms),
                    };
                    push_capped(&mut self.failovers, failover, KEEP_FAILOVERS);
                }
            }
            _ => {}
        }
    }

    /// Failovers and hand-offs, oldest first.
    pub fn failovers(&self) -> impl Iterator<Item = &Failover> {
        self.failovers.iter()
    }

    /// Recorded events, oldest first.
    pub fn events(&self) -> impl Iterator<Item = &EventRow> {
        self.events.iter()
    }
}

fn push_capped<T>(q: &mut VecDeque<T>, item: T, cap: usize) {
    if q.len() == cap {
        q.pop_front();
    }
    q.push_back(item);
}

/// The dashboard page: inline CSS and JavaScript only, so it works on a machine with no
/// way out. Cells carry `data-queue`, `data-slice` and `data-owner` (empty when unowned),
/// and `data-in-flight-too-long` when flagged, for tests and scripts. Kept in a file of
/// its own (`dashboard/page.html`) and built into the binary.
const PAGE: &str = include_str!("dashboard/page.html");

#[cfg(test)]
mod tests {
    use super::*;
    use qslice_proto::admin::{CoordinatorInfo, NodeInfo, QueueInfo, SliceInfo};

    fn ev(kind: Kind, at: i64, node: &str, queue: &str, slice: u32) -> Event {
        Event { kind: kind as i32, time_unix_ms: at, node: node.into(), queue: queue.into(), slice, ..Event::default() }
    }

    #[test]
    fn a_claim_after_an_orphaned_claim_is_a_failover_with_the_time_unowned() {
        let mut h = History::default();
        h.record(&ev(Kind::SliceClaimed, 1_000, "r1", "in", 3));
        h.record(&ev(Kind::NodeLeft, 5_000, "r1", "", 0));
        h.record(&ev(Kind::SliceOrphaned, 5_000, "r1", "in", 3));
        h.record(&ev(Kind::SliceReleased, 5_100, "r2", "in", 4));
        h.record(&ev(Kind::SliceClaimed, 6_250, "r3", "in", 4));
        h.record(&ev(Kind::SliceClaimed, 7_200, "r2", "in", 3));
        let f: Vec<_> = h.failovers().map(|f| (f.slice, f.from.as_str(), f.to.as_str(), f.cause.as_str(), f.unowned_ms)).collect();
        assert_eq!(f, vec![(4, "r2", "r3", "handoff", 1_150), (3, "r1", "r2", "failover", 2_200)]);
        // The first claim of a slice is no failover, and a node event carries no slice.
        let left = h.events().find(|e| e.kind == "node_left").expect("recorded");
        assert_eq!((left.queue.as_deref(), left.slice, left.node.as_deref()), (None, None, Some("r1")));
    }

    fn end(epoch: i64, at: i64, lease_ended: bool, ttl_ms: Option<i64>) -> ClaimEnd {
        ClaimEnd { epoch, revision: 7, at_unix_ms: at, lease: 99, lease_ended, lease_ttl_ms: ttl_ms }
    }

    #[test]
    fn idle_time_counts_from_the_last_keepalive_when_the_lease_expired() {
        // Killed at TTL 3 s: the claim went 3.05 s after the last keepalive and came back
        // 25 ms later; the slice processed nothing for about 3.2 s, not 25 ms.
        let idle = idle_time(10_000, 10_025, Some(&end(5, 10_000, true, Some(3_000))), false);
        assert_eq!((idle.stopped_unix_ms, idle.idle_ms, idle.from), (7_000, 3_025, "last_keepalive"));
        assert_eq!(idle.basis, "lease expired; from last keepalive to new claim");
        // A claim its owner deleted was worked until then.
        let idle = idle_time(10_000, 10_025, Some(&end(5, 10_000, false, Some(3_000))), false);
        assert_eq!((idle.idle_ms, idle.from), (25, "release"));
        // A lease the leader revoked ended under a live node.
        let idle = idle_time(10_000, 10_025, Some(&end(5, 10_000, true, Some(3_000))), true);
        assert_eq!((idle.idle_ms, idle.from), (25, "lease_revoked"));
        // Nothing known: the time unowned, which is a lower bound.
        for e in [None, Some(end(5, 10_000, true, None))] {
            let idle = idle_time(10_000, 10_025, e.as_ref(), false);
            assert_eq!((idle.idle_ms, idle.from), (25, "claim_deleted"));
            assert!(idle.basis.contains("at least"), "{}", idle.basis);
        }
        // Clocks of two instances may disagree a little: never negative.
        assert_eq!(idle_time(10_000, 9_990, None, false).idle_ms, 0);
    }

    #[test]
    fn a_failover_takes_its_idle_time_from_how_the_claim_ended() {
        let mut h = History::default();
        h.record(&Event { epoch: 5, ..ev(Kind::SliceOrphaned, 10_000, "r1", "in", 3) });
        h.record(&Event { epoch: 6, ..ev(Kind::SliceOrphaned, 10_000, "r1", "in", 4) });
        h.record(&ev(Kind::NodeLeft, 10_000, "r1", "", 0));
        assert_eq!(h.lost_epoch("in", 3), Some(5));
        h.record_with(&ev(Kind::SliceClaimed, 10_025, "r2", "in", 3), Some(end(5, 10_000, true, Some(3_000))));
        assert_eq!(h.lost_epoch("in", 3), None, "claimed again");
        // A fence by the leader just before the loss: the node worked until the revoke.
        h.record(&Event { epoch: 8, ..ev(Kind::SliceOrphaned, 20_000, "r3", "in", 5) });
        h.record(&ev(Kind::NodeFenced, 20_001, "r3", "in", 5));
        h.record_with(&ev(Kind::SliceClaimed, 20_040, "r2", "in", 5), Some(end(8, 20_000, true, Some(2_000))));
        h.record(&ev(Kind::SliceClaimed, 10_030, "r2", "in", 4));
        let f: Vec<_> = h.failovers().map(|f| (f.slice, f.unowned_ms, f.idle_ms, f.idle_from.as_str(), f.lease_ttl_ms)).collect();
        assert_eq!(f, vec![(3, 25, 3_025, "last_keepalive", Some(3_000)), (5, 40, 40, "lease_revoked", Some(2_000)), (4, 30, 30, "claim_deleted", None)]);
        let json = serde_json::to_value(h.failovers().next().expect("one")).expect("json");
        assert_eq!((json["idle_ms"].as_i64(), json["stopped_unix_ms"].as_i64(), json["unowned_ms"].as_i64()), (Some(3_025), Some(7_000), Some(25)));
        assert_eq!(json["idle_basis"], "lease expired; from last keepalive to new claim");
    }

    #[test]
    fn the_read_token_guards_the_data_only_when_the_admin_api_protects_reads() {
        let mut admin = AdminConfig {
            addr: "127.0.0.1:7700".parse().expect("addr"),
            token: Some("t0k".into()),
            protect_reads: false,
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            drain_deadline: Duration::from_secs(1),
        };
        assert_eq!(HttpProtection::of_admin(&admin).read_token, None, "reads are open on the admin API too");
        admin.protect_reads = true;
        admin.tls_cert = Some("/c.pem".into());
        admin.tls_key = Some("/k.pem".into());
        let p = HttpProtection::of_admin(&admin);
        assert_eq!(p.read_token.as_deref(), Some("t0k"));
        assert_eq!(p.tls, Some(("/c.pem".into(), "/k.pem".into())));
        let headers = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().expect("header"));
            h
        };
        assert!(bearer_matches(&headers("Bearer t0k"), "t0k"));
        assert!(!bearer_matches(&headers("Bearer t0k2"), "t0k"));
        assert!(!bearer_matches(&headers("t0k"), "t0k"), "the scheme is required");
        assert!(!bearer_matches(&HeaderMap::new(), "t0k"));
    }

    #[test]
    fn unreadable_tls_files_name_the_file() {
        let err = tls_config(Path::new("/nonexistent/c.pem"), Path::new("/nonexistent/k.pem")).expect_err("no such file");
        assert!(err.to_string().contains("/nonexistent/c.pem"), "{err}");
    }

    #[test]
    fn history_keeps_only_the_newest() {
        let mut h = History::default();
        for i in 0..(KEEP_EVENTS as i64 + 10) {
            h.record(&ev(Kind::SliceOrphaned, i * 10, "r1", "in", 0));
            h.record(&ev(Kind::SliceClaimed, i * 10 + 5, "r2", "in", 0));
        }
        assert_eq!(h.events().count(), KEEP_EVENTS);
        assert_eq!(h.failovers().count(), KEEP_FAILOVERS);
        assert_eq!(h.events().last().map(|e| e.time_unix_ms), Some((KEEP_EVENTS as i64 + 9) * 10 + 5));
    }

    #[test]
    fn status_body_groups_slices_by_queue_and_marks_unowned_ones() {
        let slice = |queue: &str, s: u32, holder: &str, desired: &str| SliceInfo {
            queue: queue.into(),
            slice: s,
            claim_holder: holder.into(),
            desired_owner: desired.into(),
            unowned_seconds: if holder.is_empty() { 1.5 } else { 0.0 },
            ..SliceInfo::default()
        };
        let status = GetStatusResponse {
            cluster: "demo".into(),
            leader: Some(CoordinatorInfo { id: "c1".into(), admin_address: String::new() }),
            nodes: vec![NodeInfo { id: "r1".into(), slices_held: 1, ..NodeInfo::default() }],
            queues: vec![QueueInfo { name: "in".into(), slices: 2, ..QueueInfo::default() }, QueueInfo { name: "out".into(), slices: 1, ..QueueInfo::default() }],
            slices: vec![slice("out", 0, "r1", "r1"), slice("in", 1, "", "r1"), slice("in", 0, "r1", "r2")],
            ..GetStatusResponse::default()
        };
        let mut h = History::default();
        h.record(&ev(Kind::SliceOrphaned, 10, "r2", "in", 1));
        let body = StatusBody::new(&status, &h, 42);
        assert_eq!(body.leader.as_deref(), Some("c1"));
        let cells: Vec<(String, u32, Option<String>, Option<String>)> =
            body.queues.iter().flat_map(|q| q.cells.iter().map(move |c| (q.queue.name.clone(), c.slice, c.claim_holder.clone(), c.desired_owner.clone()))).collect();
        assert_eq!(
            cells,
            vec![("in".into(), 0, Some("r1".into()), Some("r2".into())), ("in".into(), 1, None, Some("r1".into())), ("out".into(), 0, Some("r1".into()), Some("r1".into())),]
        );
        let json = serde_json::to_value(&body).expect("json");
        assert_eq!(json["queues"][0]["cells"][1]["claim_holder"], serde_json::Value::Null);
        assert_eq!(json["queues"][0]["cells"][1]["unowned_seconds"], 1.5);
        assert_eq!(json["events"][0]["kind"], "slice_orphaned");
        assert_eq!(json["singletons"], serde_json::json!([]), "no singleton runs");
        let with = GetStatusResponse {
            singletons: vec![qslice_proto::admin::SingletonInfo { name: "digests".into(), holder: "r1".into(), held_seconds: 5, epoch: 9, ..Default::default() }],
            ..status
        };
        let json = serde_json::to_value(StatusBody::new(&with, &h, 42)).expect("json");
        assert_eq!(json["singletons"][0]["name"], "digests");
        assert_eq!(json["singletons"][0]["holder"], "r1");
        assert_eq!(json["singletons"][0]["held_seconds"], 5);
    }

    #[test]
    fn api_status_json_keeps_the_fields_the_page_draws() {
        // The page's script and outside scripts read these names: the JSON is a contract.
        let mut h = History::default();
        h.record(&ev(Kind::SliceOrphaned, 10, "n1", "in", 1));
        let body = StatusBody::new(&crate::status_rows::fixtures::status_reply(), &h, 42);
        let expected = r#"{"cluster":"prod","leader":"coord-a","standbys":["coord-b"],"maintenance":true,"alerts":["slice in/1 unowned for 12s"],"nodes":[{"id":"n1","host":"n1.example","weight":1,"queues":[],"cordoned":false,"incarnation":"inc-1","age_seconds":185,"slices_held":4,"version":"0.1.0","metrics_address":null},{"id":"node-two","host":"node-two.example","weight":1,"queues":["in","out"],"cordoned":true,"incarnation":"inc-1","age_seconds":185,"slices_held":4,"version":"0.1.0","metrics_address":null}],"queues":[{"name":"in","slices":4,"paused":false,"mailman3":false,"old_slicing_claims":0,"no_eligible_node":false,"refused_by":[],"state":"active","cells":[{"queue":"in","slice":0,"desired_owner":"n1","claim_holder":"n1","epoch":42,"depth":3,"oldest_entry_age_seconds":185.0,"unowned_seconds":0.0,"pinned":true,"in_flight":1,"oldest_in_flight_age_seconds":725.0,"in_flight_too_long":true,"no_eligible_node":false,"held_after_revoke_of":null},{"queue":"in","slice":1,"desired_owner":"n1","claim_holder":null,"epoch":0,"depth":0,"oldest_entry_age_seconds":0.0,"unowned_seconds":12.0,"pinned":false,"in_flight":2,"oldest_in_flight_age_seconds":4.0,"in_flight_too_long":false,"no_eligible_node":false,"held_after_revoke_of":"node-two"}]},{"name":"out","slices":8,"paused":true,"mailman3":true,"old_slicing_claims":0,"no_eligible_node":false,"refused_by":[],"state":"paused","cells":[]},{"name":"bounces","slices":1,"paused":false,"mailman3":false,"old_slicing_claims":0,"no_eligible_node":true,"refused_by":["n1"],"state":"no eligible node (refused by n1; cordoned: node-two)","cells":[{"queue":"bounces","slice":0,"desired_owner":null,"claim_holder":null,"epoch":0,"depth":0,"oldest_entry_age_seconds":0.0,"unowned_seconds":30.0,"pinned":false,"in_flight":0,"oldest_in_flight_age_seconds":0.0,"in_flight_too_long":false,"no_eligible_node":true,"held_after_revoke_of":null}]}],"failovers":[],"events":[{"time_unix_ms":10,"kind":"slice_orphaned","node":"n1","queue":"in","slice":1,"epoch":null,"message":null}],"singletons":[{"name":"digests","holder":"n1","incarnation":"inc-1","held_seconds":3725,"epoch":57,"last_slot_unix_seconds":1796083200,"last_outcome":"ok"},{"name":"notify","holder":null,"incarnation":null,"held_seconds":0,"epoch":0,"last_slot_unix_seconds":null,"last_outcome":null}],"generated_unix_ms":42}"#;
        assert_eq!(serde_json::to_string(&body).expect("json"), expected);
    }
}
