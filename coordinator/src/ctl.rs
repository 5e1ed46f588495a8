//! qslicectl's client side of the admin API: connecting (several addresses, next on
//! failure), the bearer token, and rendering replies as tables or JSON.
//!
//! Contract: a call goes to the first address that answers. A failed connection or an
//! `UNAVAILABLE` status moves on to the next address (any coordinator instance serves the
//! API, and one that cannot reach etcd says `UNAVAILABLE`); every other status is the
//! answer. Unary calls, and the opening of a stream, are bounded by the per-call timeout;
//! a stream, once open, is not. Rendering is pure: the `*_row(s)` functions turn replies
//! into serde rows (the `--json` output) and the `render_*` functions turn rows into
//! tables.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use qslice_proto::admin::admin_client::AdminClient;
use qslice_proto::admin::{
    event, CoordinatorInfo, DrainNodeRequest, DrainProgress, Event, GetStatusRequest, GetStatusResponse,
    ListNodesRequest, ListQueuesRequest, MoveSliceRequest, NodeInfo, NodeRequest, PinSliceRequest, PinSliceResponse,
    PlannedMove, PutQueueRequest, QueueInfo, QueueRequest, RebalanceRequest, RebalanceResponse, SetMaintenanceRequest,
    SliceInfo, SliceRef, WatchEventsRequest,
};
use serde::Serialize;
use tonic::codegen::http::Uri;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status, Streaming};

use crate::offline::format_age;

/// The address used when `--coordinator` is not given.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7700";

/// How long `events` without `--follow` listens before it exits.
pub const EVENTS_WINDOW: Duration = Duration::from_secs(1);

/// A failure of the admin client.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// An entry of `--coordinator` is not an http(s) address.
    #[error("--coordinator: {address:?}: {reason}")]
    ParseAddress {
        /// The entry as given.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `--coordinator` named no address at all.
    #[error("--coordinator: no address given")]
    NoAddress,
    /// The token cannot be sent as a header value.
    #[error("--token: not a valid header value (printable ASCII only)")]
    BadToken,
    /// An https address was given without a CA to check its certificate.
    #[error("{address}: https needs --ca FILE (or QSLICE_ADMIN_CA)")]
    MissingCa {
        /// The https address.
        address: String,
    },
    /// Reading a CA, certificate or key file failed.
    #[error("reading {path}")]
    ReadTlsFile {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
    /// Applying the TLS configuration to an address failed.
    #[error("{address}: TLS configuration")]
    ConfigureTls {
        /// The https address.
        address: String,
        /// What tonic refused.
        #[source]
        source: tonic::transport::Error,
    },
    /// No address answered; each one with the reason.
    #[error("no coordinator answered: {}", describe_failures(.0))]
    NoCoordinator(Vec<(String, String)>),
    /// The coordinator answered with an error status (final, not retried elsewhere).
    #[error("{}", describe_status(.0))]
    Rpc(Status),
    /// A drain stream ended before it reported the node drained.
    #[error("drain of {node:?} ended before the node was drained")]
    DrainUnfinished {
        /// The node being drained.
        node: String,
    },
    /// The coordinator closed the event stream while it was followed.
    #[error("the coordinator closed the event stream")]
    EventsEnded,
}

fn describe_failures(failures: &[(String, String)]) -> String {
    failures.iter().map(|(addr, why)| format!("{addr}: {why}")).collect::<Vec<_>>().join("; ")
}

/// A status as the operator reads it: `NOT_FOUND: queue "x" does not exist`.
pub fn describe_status(status: &Status) -> String {
    if status.message().is_empty() {
        code_name(status.code()).to_owned()
    } else {
        format!("{}: {}", code_name(status.code()), status.message())
    }
}

/// The canonical gRPC name of a status code, e.g. `NOT_FOUND`.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

// ---------------------------------------------------------------------------------------
// Addresses and fallback

/// Splits a comma-separated `--coordinator` list and normalises each entry: `host:port`
/// becomes `http://host:port`, the scheme is lower-cased, a trailing `/` is dropped.
pub fn parse_addresses(list: &str) -> Result<Vec<String>, CtlError> {
    let addresses = list
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(normalize_address)
        .collect::<Result<Vec<_>, _>>()?;
    if addresses.is_empty() {
        return Err(CtlError::NoAddress);
    }
    Ok(addresses)
}

/// One `--coordinator` entry as an `http://` or `https://` URI without a path.
pub fn normalize_address(address: &str) -> Result<String, CtlError> {
    let bad = |reason: &str| CtlError::ParseAddress { address: address.to_owned(), reason: reason.to_owned() };
    let (scheme, rest) = match address.split_once("://") {
        Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
            s @ ("http" | "https") => (s.to_owned(), rest),
            _ => return Err(bad("the scheme must be http or https")),
        },
        None => ("http".to_owned(), address),
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return Err(bad("no host"));
    }
    let trimmed = format!("{scheme}://{rest}");
    let uri: Uri = trimmed.parse().map_err(|_| bad("not a URI"))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("an address has no path"));
    }
    Ok(trimmed)
}

/// Why one address did not give an answer.
#[derive(Debug)]
pub enum AttemptError {
    /// No connection could be made; the text says why.
    Connect(String),
    /// The coordinator answered with an error status.
    Rpc(Status),
}

/// Runs `attempt` on each address in order and returns the first answer. A connection
/// failure or `UNAVAILABLE` moves on to the next address; any other status is final.
pub async fn first_answering<T, F, Fut>(addresses: &[String], mut attempt: F) -> Result<T, CtlError>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<T, AttemptError>>,
{
    let mut failures = Vec::new();
    for address in addresses {
        match attempt(address.clone()).await {
            Ok(answer) => return Ok(answer),
            Err(AttemptError::Connect(why)) => failures.push((address.clone(), why)),
            Err(AttemptError::Rpc(status)) if status.code() == Code::Unavailable => {
                failures.push((address.clone(), describe_status(&status)));
            }
            Err(AttemptError::Rpc(status)) => return Err(CtlError::Rpc(status)),
        }
    }
    Err(CtlError::NoCoordinator(failures))
}

/// An error and its causes on one line (tonic's transport errors say little on their own).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

// ---------------------------------------------------------------------------------------
// Token and TLS

/// The interceptor that sends `authorization: Bearer <token>` on every call.
#[derive(Clone, Debug, Default)]
pub struct BearerToken {
    /// The header value, or `None` to send no header.
    header: Option<MetadataValue<Ascii>>,
}

impl BearerToken {
    /// The interceptor for `token`; no token, or an empty one, sends no header.
    pub fn new(token: Option<&str>) -> Result<Self, CtlError> {
        let header = match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => None,
            Some(t) => {
                let mut value: MetadataValue<Ascii> = format!("Bearer {t}").parse().map_err(|_| CtlError::BadToken)?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        Ok(Self { header })
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.header {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The files for https addresses: the CA that signs the coordinators' certificates, and
/// optionally a client certificate and key for mutual TLS.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// PEM CA bundle (`--ca`).
    pub ca: Option<PathBuf>,
    /// PEM client certificate (`--cert`).
    pub cert: Option<PathBuf>,
    /// PEM client key (`--key`).
    pub key: Option<PathBuf>,
}

/// The TLS configuration for `addresses`: `None` when none is https; an https address
/// without a CA is an error (this build has no system trust store).
pub fn tls_config(addresses: &[String], files: &TlsFiles) -> Result<Option<ClientTlsConfig>, CtlError> {
    let Some(https) = addresses.iter().find(|a| a.starts_with("https://")) else {
        return Ok(None);
    };
    let read =
        |path: &PathBuf| std::fs::read(path).map_err(|source| CtlError::ReadTlsFile { path: path.clone(), source });
    let ca = files.ca.as_ref().ok_or_else(|| CtlError::MissingCa { address: https.clone() })?;
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
    if let (Some(cert), Some(key)) = (&files.cert, &files.key) {
        config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(Some(config))
}

// ---------------------------------------------------------------------------------------
// The client

/// A generated admin client on one connection, with the token interceptor.
pub type AdminApi = AdminClient<InterceptedService<Channel, BearerToken>>;

/// How to reach the coordinators.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Normalised addresses, tried in order (see [`parse_addresses`]).
    pub addresses: Vec<String>,
    /// The bearer token, if any.
    pub token: Option<String>,
    /// Files for https addresses.
    pub tls: TlsFiles,
    /// Bound on connecting, on each unary call and on opening a stream.
    pub timeout: Duration,
}

/// The admin API of a cluster, reached through the first coordinator that answers.
pub struct Admin {
    /// Addresses in the order they are tried.
    addresses: Vec<String>,
    /// Sent on every call.
    token: BearerToken,
    /// Applied to https addresses.
    tls: Option<ClientTlsConfig>,
    /// See [`ClientOptions::timeout`].
    timeout: Duration,
}

impl Admin {
    /// Checks the options (token, TLS files); connects nothing yet.
    pub fn new(options: &ClientOptions) -> Result<Self, CtlError> {
        if options.addresses.is_empty() {
            return Err(CtlError::NoAddress);
        }
        Ok(Self {
            token: BearerToken::new(options.token.as_deref())?,
            tls: tls_config(&options.addresses, &options.tls)?,
            addresses: options.addresses.clone(),
            timeout: options.timeout,
        })
    }

    async fn connect(&self, address: &str) -> Result<AdminApi, AttemptError> {
        let mut endpoint = Endpoint::from_shared(address.to_owned())
            .map_err(|e| AttemptError::Connect(error_chain(&e)))?
            .connect_timeout(self.timeout);
        if let (true, Some(tls)) = (address.starts_with("https://"), &self.tls) {
            endpoint = endpoint.tls_config(tls.clone()).map_err(|e| AttemptError::Connect(error_chain(&e)))?;
        }
        let channel = endpoint.connect().await.map_err(|e| AttemptError::Connect(error_chain(&e)))?;
        Ok(AdminClient::with_interceptor(channel, self.token.clone()))
    }

    /// Sends one call (built by `rpc` on a fresh client per address) to the first
    /// coordinator that answers, within the per-call timeout.
    pub async fn call<T, F, Fut>(&self, mut rpc: F) -> Result<T, CtlError>
    where
        F: FnMut(AdminApi) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        // The closure is called once per address; the cell lends it to each attempt.
        let rpc = std::cell::RefCell::new(&mut rpc);
        let rpc = &rpc;
        let this: &Admin = self;
        first_answering(&self.addresses, move |address| async move {
            let client = this.connect(&address).await?;
            let reply = (rpc.borrow_mut())(client);
            match tokio::time::timeout(this.timeout, reply).await {
                Ok(reply) => reply.map(tonic::Response::into_inner).map_err(AttemptError::Rpc),
                Err(_) => Err(AttemptError::Rpc(Status::deadline_exceeded(format!(
                    "{address} did not answer within {}",
                    humantime::format_duration(this.timeout)
                )))),
            }
        })
        .await
    }

    /// GetStatus; per-slice rows only when `include_slices`.
    pub async fn status(&self, include_slices: bool) -> Result<GetStatusResponse, CtlError> {
        self.call(|mut c| async move { c.get_status(GetStatusRequest { include_slices }).await }).await
    }

    /// ListNodes.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, CtlError> {
        Ok(self.call(|mut c| async move { c.list_nodes(ListNodesRequest {}).await }).await?.nodes)
    }

    /// ListQueues.
    pub async fn queues(&self) -> Result<Vec<QueueInfo>, CtlError> {
        Ok(self.call(|mut c| async move { c.list_queues(ListQueuesRequest {}).await }).await?.queues)
    }

    /// PutQueue: create a queue or change its slice count.
    pub async fn put_queue(&self, name: &str, slices: u32, mailman3: bool) -> Result<Option<QueueInfo>, CtlError> {
        let request = PutQueueRequest { name: name.to_owned(), slices, mailman3 };
        let reply = self.call(|mut c| {
            let request = request.clone();
            async move { c.put_queue(request).await }
        });
        Ok(reply.await?.queue)
    }

    /// DeleteQueue, PauseQueue or ResumeQueue.
    pub async fn change_queue(&self, change: QueueChange, name: &str) -> Result<Option<QueueInfo>, CtlError> {
        let request = QueueRequest { name: name.to_owned() };
        let reply = self.call(|mut c| {
            let request = request.clone();
            async move {
                match change {
                    QueueChange::Delete => c.delete_queue(request).await,
                    QueueChange::Pause => c.pause_queue(request).await,
                    QueueChange::Resume => c.resume_queue(request).await,
                }
            }
        });
        Ok(reply.await?.queue)
    }

    /// CordonNode (`cordon == true`) or UncordonNode.
    pub async fn cordon(&self, node: &str, cordon: bool) -> Result<Option<NodeInfo>, CtlError> {
        let request = NodeRequest { node: node.to_owned() };
        let reply = self.call(|mut c| {
            let request = request.clone();
            async move {
                if cordon {
                    c.cordon_node(request).await
                } else {
                    c.uncordon_node(request).await
                }
            }
        });
        Ok(reply.await?.node)
    }

    /// MoveSlice: a planned hand-off of one slice to `target_node`.
    pub async fn move_slice(&self, queue: &str, slice: u32, target_node: &str) -> Result<MoveRow, CtlError> {
        let request = MoveSliceRequest { slice: Some(slice_ref(queue, slice)), target_node: target_node.to_owned() };
        let reply = self
            .call(|mut c| {
                let request = request.clone();
                async move { c.move_slice(request).await }
            })
            .await?;
        Ok(MoveRow {
            queue: queue.to_owned(),
            slice,
            from_node: non_empty(&reply.from_node),
            to_node: non_empty(&reply.to_node),
            reason: None,
        })
    }

    /// PinSlice (`node` given) or UnpinSlice (`None`).
    pub async fn pin(&self, queue: &str, slice: u32, node: Option<&str>) -> Result<PinRow, CtlError> {
        let reply: PinSliceResponse = match node {
            Some(node) => {
                let request = PinSliceRequest { slice: Some(slice_ref(queue, slice)), node: node.to_owned() };
                self.call(|mut c| {
                    let request = request.clone();
                    async move { c.pin_slice(request).await }
                })
                .await?
            }
            None => self.call(|mut c| async move { c.unpin_slice(slice_ref(queue, slice)).await }).await?,
        };
        let (queue, slice) = reply.slice.map_or((queue.to_owned(), slice), |s| (s.queue, s.slice));
        Ok(PinRow { queue, slice, node: non_empty(&reply.node) })
    }

    /// Rebalance; with `dry_run` the moves are only planned.
    pub async fn rebalance(&self, dry_run: bool) -> Result<RebalanceResponse, CtlError> {
        self.call(|mut c| async move { c.rebalance(RebalanceRequest { dry_run }).await }).await
    }

    /// SetMaintenance; returns the mode now in force.
    pub async fn set_maintenance(&self, on: bool) -> Result<bool, CtlError> {
        Ok(self.call(|mut c| async move { c.set_maintenance(SetMaintenanceRequest { on }).await }).await?.on)
    }

    /// Opens a server stream on the first coordinator that answers.
    async fn open_stream<T, F, Fut>(&self, rpc: F) -> Result<Streaming<T>, CtlError>
    where
        F: FnMut(AdminApi) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Streaming<T>>, Status>>,
    {
        self.call(rpc).await
    }

    /// DrainNode: hands every progress message to `emit`; `Ok` only when the last one
    /// says the node is drained.
    pub async fn drain(
        &self,
        node: &str,
        timeout_seconds: u32,
        mut emit: impl FnMut(&DrainProgress),
    ) -> Result<(), CtlError> {
        let request = DrainNodeRequest { node: node.to_owned(), timeout_seconds };
        let mut stream = self
            .open_stream(|mut c| {
                let request = request.clone();
                async move { c.drain_node(request).await }
            })
            .await?;
        let mut done = false;
        while let Some(progress) = stream.message().await.map_err(CtlError::Rpc)? {
            emit(&progress);
            done = progress.done;
        }
        if done {
            Ok(())
        } else {
            Err(CtlError::DrainUnfinished { node: node.to_owned() })
        }
    }

    /// WatchEvents: hands each event to `emit` for `window`, or until interrupted (Ctrl-C)
    /// when `window` is `None`.
    pub async fn watch_events(&self, window: Option<Duration>, mut emit: impl FnMut(&Event)) -> Result<(), CtlError> {
        let mut stream = self.open_stream(|mut c| async move { c.watch_events(WatchEventsRequest {}).await }).await?;
        let deadline = window.map(|w| tokio::time::Instant::now() + w);
        loop {
            let next = match deadline {
                Some(deadline) => match tokio::time::timeout_at(deadline, stream.message()).await {
                    Ok(next) => next,
                    Err(_) => return Ok(()),
                },
                None => tokio::select! {
                    next = stream.message() => next,
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                },
            };
            match next.map_err(CtlError::Rpc)? {
                Some(event) => emit(&event),
                None if deadline.is_some() => return Ok(()),
                None => return Err(CtlError::EventsEnded),
            }
        }
    }
}

/// A change of one queue that needs only its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueChange {
    /// DeleteQueue.
    Delete,
    /// PauseQueue.
    Pause,
    /// ResumeQueue.
    Resume,
}

impl QueueChange {
    /// The past tense used in the reply line, e.g. `paused`.
    pub fn done_verb(self) -> &'static str {
        match self {
            QueueChange::Delete => "deleted",
            QueueChange::Pause => "paused",
            QueueChange::Resume => "resumed",
        }
    }
}

fn slice_ref(queue: &str, slice: u32) -> SliceRef {
    SliceRef { queue: queue.to_owned(), slice }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

// ---------------------------------------------------------------------------------------
// Rows (the JSON output)

/// A coordinator instance.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CoordinatorRow {
    /// Its id.
    pub id: String,
    /// Where it serves the admin API.
    pub admin_address: String,
}

/// A runner node.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeRow {
    /// Node id.
    pub id: String,
    /// Host name.
    pub host: String,
    /// Relative share of slices.
    pub weight: u32,
    /// Queues it serves; empty means every queue.
    pub queues: Vec<String>,
    /// Whether it takes no new slices.
    pub cordoned: bool,
    /// The runner process's incarnation.
    pub incarnation: String,
    /// Seconds since it joined.
    pub age_seconds: u64,
    /// Slices it holds claims on.
    pub slices_held: u32,
    /// qslice version of the runner.
    pub version: String,
    /// Where its metrics are served, if anywhere.
    pub metrics_address: Option<String>,
}

/// A queue.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QueueRow {
    /// Queue name.
    pub name: String,
    /// Slice count.
    pub slices: u32,
    /// Whether no runner processes it.
    pub paused: bool,
    /// Whether it is a Mailman 3 queue.
    pub mailman3: bool,
    /// Claims still held under another slice count (a reslice in progress).
    pub old_slicing_claims: u32,
    /// Whether the queue is active and no live node may take its slices.
    pub no_eligible_node: bool,
    /// Live nodes that gave the queue up.
    pub refused_by: Vec<String>,
    /// The state in words, e.g. `active`, `no eligible node (refused by r1, r2)`.
    pub state: String,
}

/// Ownership and figures of one slice.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SliceRow {
    /// Queue name.
    pub queue: String,
    /// Slice number.
    pub slice: u32,
    /// Node the coordinator assigned it to.
    pub desired_owner: Option<String>,
    /// Node that holds the claim now.
    pub claim_holder: Option<String>,
    /// Create revision of the claim key.
    pub epoch: i64,
    /// Entries waiting.
    pub depth: u64,
    /// Age of the oldest entry, seconds.
    pub oldest_entry_age_seconds: f64,
    /// Seconds without a claim holder; 0 while it has one.
    pub unowned_seconds: f64,
    /// Whether the assignment is pinned.
    pub pinned: bool,
    /// Entries in flight (`.bak`).
    pub in_flight: u64,
    /// Age of the oldest entry in flight, seconds (0 when none).
    pub oldest_in_flight_age_seconds: f64,
    /// Whether that is longer than the coordinator's `in_flight_alert_after`.
    pub in_flight_too_long: bool,
    /// Whether no live node may take the slice's queue.
    pub no_eligible_node: bool,
}

/// The `status` reply.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StatusView {
    /// Cluster name.
    pub cluster: String,
    /// The leading coordinator, if one leads.
    pub leader: Option<CoordinatorRow>,
    /// Coordinators standing by.
    pub standbys: Vec<CoordinatorRow>,
    /// Whether maintenance mode is on.
    pub maintenance: bool,
    /// Active alerts.
    pub alerts: Vec<String>,
    /// Runner nodes.
    pub nodes: Vec<NodeRow>,
    /// Queues.
    pub queues: Vec<QueueRow>,
    /// Per-slice rows; absent unless asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slices: Option<Vec<SliceRow>>,
}

/// A slice move, done or planned.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MoveRow {
    /// Queue name.
    pub queue: String,
    /// Slice number.
    pub slice: u32,
    /// Node it leaves, if it had one.
    pub from_node: Option<String>,
    /// Node it goes to.
    pub to_node: Option<String>,
    /// Why the planner moves it (rebalance only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The `rebalance` reply.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RebalanceView {
    /// Whether the moves were written (false for a dry run).
    pub applied: bool,
    /// The moves.
    pub moves: Vec<MoveRow>,
}

/// The `pin` and `unpin` reply.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PinRow {
    /// Queue name.
    pub queue: String,
    /// Slice number.
    pub slice: u32,
    /// The node it is pinned to; `None` once unpinned.
    pub node: Option<String>,
}

/// One `drain` progress message.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DrainRow {
    /// The node being drained.
    pub node: String,
    /// Slices still on it.
    pub slices_remaining: u32,
    /// Slices moved away so far.
    pub slices_moved: u32,
    /// Whether the drain is complete.
    pub done: bool,
    /// What the coordinator says, if anything.
    pub message: Option<String>,
}

/// One cluster event.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EventRow {
    /// Kind in lower case, e.g. `node_joined` (see [`event_kind_name`]).
    pub kind: String,
    /// Milliseconds since the Unix epoch.
    pub time_unix_ms: i64,
    /// The time as RFC 3339 (UTC).
    pub time: String,
    /// Node concerned.
    pub node: Option<String>,
    /// Queue concerned.
    pub queue: Option<String>,
    /// Slice concerned (only with a queue).
    pub slice: Option<u32>,
    /// Claim epoch (only when the server sends one).
    pub epoch: Option<i64>,
    /// Free text.
    pub message: Option<String>,
}

/// A coordinator as a row.
pub fn coordinator_row(c: &CoordinatorInfo) -> CoordinatorRow {
    CoordinatorRow { id: c.id.clone(), admin_address: c.admin_address.clone() }
}

/// A node as a row.
pub fn node_row(n: &NodeInfo) -> NodeRow {
    NodeRow {
        id: n.id.clone(),
        host: n.host.clone(),
        weight: n.weight,
        queues: n.queues.clone(),
        cordoned: n.cordoned,
        incarnation: n.incarnation.clone(),
        age_seconds: n.age_seconds,
        slices_held: n.slices_held,
        version: n.version.clone(),
        metrics_address: non_empty(&n.metrics_address),
    }
}

/// Nodes as rows.
pub fn node_rows(nodes: &[NodeInfo]) -> Vec<NodeRow> {
    nodes.iter().map(node_row).collect()
}

/// A queue as a row.
pub fn queue_row(q: &QueueInfo) -> QueueRow {
    QueueRow {
        name: q.name.clone(),
        slices: q.slices,
        paused: q.paused,
        mailman3: q.mailman3,
        old_slicing_claims: q.old_slicing_claims,
        no_eligible_node: q.no_eligible_node,
        refused_by: q.refused_by.clone(),
        state: if q.state.is_empty() { legacy_state(q.paused, q.old_slicing_claims) } else { q.state.clone() },
    }
}

/// The state of a queue from a coordinator too old to send it.
fn legacy_state(paused: bool, old_slicing_claims: u32) -> String {
    match (paused, old_slicing_claims) {
        (true, _) => "paused".to_owned(),
        (false, 0) => "active".to_owned(),
        (false, n) => format!("reslicing ({n} old claims)"),
    }
}

/// Queues as rows.
pub fn queue_rows(queues: &[QueueInfo]) -> Vec<QueueRow> {
    queues.iter().map(queue_row).collect()
}

/// A slice as a row.
pub fn slice_row(s: &SliceInfo) -> SliceRow {
    SliceRow {
        queue: s.queue.clone(),
        slice: s.slice,
        desired_owner: non_empty(&s.desired_owner),
        claim_holder: non_empty(&s.claim_holder),
        epoch: s.epoch,
        depth: s.depth,
        oldest_entry_age_seconds: s.oldest_entry_age_seconds,
        unowned_seconds: s.unowned_seconds,
        pinned: s.pinned,
        in_flight: s.in_flight,
        oldest_in_flight_age_seconds: s.oldest_in_flight_age_seconds,
        in_flight_too_long: s.in_flight_too_long,
        no_eligible_node: s.no_eligible_node,
    }
}

/// The status reply as a view; `slices` is kept only when it was asked for.
pub fn status_view(r: &GetStatusResponse, include_slices: bool) -> StatusView {
    StatusView {
        cluster: r.cluster.clone(),
        leader: r.leader.as_ref().map(coordinator_row),
        standbys: r.standbys.iter().map(coordinator_row).collect(),
        maintenance: r.maintenance,
        alerts: r.alerts.clone(),
        nodes: node_rows(&r.nodes),
        queues: queue_rows(&r.queues),
        slices: include_slices.then(|| r.slices.iter().map(slice_row).collect()),
    }
}

/// A planned move as a row.
pub fn planned_move_row(m: &PlannedMove) -> MoveRow {
    let (queue, slice) = m.slice.as_ref().map_or((String::new(), 0), |s| (s.queue.clone(), s.slice));
    MoveRow {
        queue,
        slice,
        from_node: non_empty(&m.from_node),
        to_node: non_empty(&m.to_node),
        reason: Some(m.reason.clone()),
    }
}

/// The rebalance reply as a view.
pub fn rebalance_view(r: &RebalanceResponse) -> RebalanceView {
    RebalanceView { applied: r.applied, moves: r.moves.iter().map(planned_move_row).collect() }
}

/// A drain progress message as a row.
pub fn drain_row(p: &DrainProgress) -> DrainRow {
    DrainRow {
        node: p.node.clone(),
        slices_remaining: p.slices_remaining,
        slices_moved: p.slices_moved,
        done: p.done,
        message: non_empty(&p.message),
    }
}

/// The lower-case name of an event kind, e.g. `node_joined`; `unknown_<n>` for a kind
/// newer than this client.
pub fn event_kind_name(kind: i32) -> String {
    match event::Kind::try_from(kind) {
        Ok(event::Kind::Unspecified) => "unspecified".to_owned(),
        Ok(k) => k.as_str_name().to_ascii_lowercase(),
        Err(_) => format!("unknown_{kind}"),
    }
}

/// Milliseconds since the Unix epoch as RFC 3339 with milliseconds.
pub fn format_unix_ms(ms: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_millis(ms.max(0).unsigned_abs());
    humantime::format_rfc3339_millis(time).to_string()
}

/// An event as a row.
pub fn event_row(e: &Event) -> EventRow {
    EventRow {
        kind: event_kind_name(e.kind),
        time_unix_ms: e.time_unix_ms,
        time: format_unix_ms(e.time_unix_ms),
        node: non_empty(&e.node),
        queue: non_empty(&e.queue),
        slice: (!e.queue.is_empty() && !e.whole_queue).then_some(e.slice),
        epoch: (e.epoch != 0).then_some(e.epoch),
        message: non_empty(&e.message),
    }
}

// ---------------------------------------------------------------------------------------
// Tables and lines

/// Left-aligned columns two spaces apart under a header line; no trailing blanks.
pub fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            out.push_str(cell);
            let pad = widths.get(i).copied().unwrap_or(0).saturating_sub(cell.chars().count());
            out.extend(std::iter::repeat_n(' ', pad));
        }
        let mut out = out.trim_end().to_owned();
        out.push('\n');
        out
    };
    let mut out = line(&mut header.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

fn dash(s: &Option<String>) -> String {
    s.clone().unwrap_or_else(|| "-".to_owned())
}

/// The nodes table.
pub fn render_nodes(nodes: &[NodeRow]) -> String {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.id.clone(),
                n.host.clone(),
                if n.cordoned { "cordoned" } else { "ready" }.to_owned(),
                n.weight.to_string(),
                n.slices_held.to_string(),
                if n.queues.is_empty() { "*".to_owned() } else { n.queues.join(",") },
                format_age(n.age_seconds as f64),
                n.version.clone(),
            ]
        })
        .collect();
    render_table(&["NODE", "HOST", "STATE", "WEIGHT", "SLICES", "QUEUES", "AGE", "VERSION"], &rows)
}

/// The queues table. MAILMAN says which Mailman's slicing rules the queue follows: `2.1`
/// (any slice count) or `3` (a power of two, read from mailman.cfg).
pub fn render_queues(queues: &[QueueRow]) -> String {
    let rows: Vec<Vec<String>> = queues
        .iter()
        .map(|q| vec![q.name.clone(), q.slices.to_string(), if q.mailman3 { "3" } else { "2.1" }.to_owned(), q.state.clone()])
        .collect();
    render_table(&["QUEUE", "SLICES", "MAILMAN", "STATE"], &rows)
}

/// The per-slice table of `status --slices`. IN FLIGHT is the age of the slice's oldest
/// in-flight entry, marked `(too long)` past the coordinator's `in_flight_alert_after`.
pub fn render_slices(slices: &[SliceRow]) -> String {
    let rows: Vec<Vec<String>> = slices
        .iter()
        .map(|s| {
            let desired = match (&s.desired_owner, s.pinned) {
                (Some(owner), true) => format!("{owner} (pinned)"),
                (owner, _) => dash(owner),
            };
            let unowned = match (s.claim_holder.is_some(), s.no_eligible_node) {
                (true, _) => "-".to_owned(),
                (false, true) => format!("{} (no eligible node)", format_age(s.unowned_seconds)),
                (false, false) if s.unowned_seconds > 0.0 => format_age(s.unowned_seconds),
                (false, false) => "-".to_owned(),
            };
            let in_flight = match (s.in_flight, s.in_flight_too_long) {
                (0, _) => "-".to_owned(),
                (_, true) => format!("{} (too long)", format_age(s.oldest_in_flight_age_seconds)),
                (_, false) => format_age(s.oldest_in_flight_age_seconds),
            };
            vec![
                s.queue.clone(),
                s.slice.to_string(),
                desired,
                dash(&s.claim_holder),
                if s.claim_holder.is_some() { s.epoch.to_string() } else { "-".to_owned() },
                s.depth.to_string(),
                if s.depth > 0 { format_age(s.oldest_entry_age_seconds) } else { "-".to_owned() },
                in_flight,
                unowned,
            ]
        })
        .collect();
    render_table(&["QUEUE", "SLICE", "DESIRED", "HOLDER", "EPOCH", "DEPTH", "OLDEST", "IN FLIGHT", "UNOWNED"], &rows)
}

/// The status as text: a summary, then the nodes, queues and (if asked) slices tables.
pub fn render_status(s: &StatusView) -> String {
    let coordinator = |c: &CoordinatorRow| {
        if c.admin_address.is_empty() {
            c.id.clone()
        } else {
            format!("{} ({})", c.id, c.admin_address)
        }
    };
    let mut out = format!("cluster:     {}\n", if s.cluster.is_empty() { "-" } else { &s.cluster });
    out.push_str(&format!("leader:      {}\n", s.leader.as_ref().map_or_else(|| "none".to_owned(), coordinator)));
    let standbys = s.standbys.iter().map(coordinator).collect::<Vec<_>>();
    out.push_str(&format!(
        "standbys:    {}\n",
        if standbys.is_empty() { "none".to_owned() } else { standbys.join(", ") }
    ));
    out.push_str(&format!("maintenance: {}\n", if s.maintenance { "on" } else { "off" }));
    for alert in &s.alerts {
        out.push_str(&format!("alert:       {alert}\n"));
    }
    out.push('\n');
    out.push_str(&render_nodes(&s.nodes));
    out.push('\n');
    out.push_str(&render_queues(&s.queues));
    if let Some(slices) = &s.slices {
        out.push('\n');
        out.push_str(&render_slices(slices));
    }
    out
}

/// The reply to `queue set|delete|pause|resume`: a line, then the queue if still there.
pub fn render_queue_reply(done_verb: &str, name: &str, queue: Option<&QueueRow>) -> String {
    let mut out = format!("queue {name} {done_verb}\n");
    if let Some(q) = queue.filter(|_| done_verb != "deleted") {
        out.push_str(&render_queues(std::slice::from_ref(q)));
    }
    out
}

/// The reply to `cordon` and `uncordon`: a line, then the node if the reply has it.
pub fn render_node_reply(done_verb: &str, name: &str, node: Option<&NodeRow>) -> String {
    let mut out = format!("node {name} {done_verb}\n");
    if let Some(n) = node {
        out.push_str(&render_nodes(std::slice::from_ref(n)));
    }
    out
}

/// The reply to `move`.
pub fn render_move(m: &MoveRow) -> String {
    format!("moving {}/{}: {} -> {}\n", m.queue, m.slice, dash(&m.from_node), dash(&m.to_node))
}

/// The reply to `pin` and `unpin`.
pub fn render_pin(p: &PinRow) -> String {
    match &p.node {
        Some(node) => format!("{}/{} pinned to {node}\n", p.queue, p.slice),
        None => format!("{}/{} unpinned\n", p.queue, p.slice),
    }
}

/// The planned (or applied) moves of `rebalance`, with a closing line.
pub fn render_rebalance(r: &RebalanceView) -> String {
    if r.moves.is_empty() {
        return "no moves: the assignment is balanced\n".to_owned();
    }
    let rows: Vec<Vec<String>> = r
        .moves
        .iter()
        .map(|m| {
            vec![
                m.queue.clone(),
                m.slice.to_string(),
                dash(&m.from_node),
                dash(&m.to_node),
                m.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let mut out = render_table(&["QUEUE", "SLICE", "FROM", "TO", "REASON"], &rows);
    let n = r.moves.len();
    let moves = if n == 1 { "move" } else { "moves" };
    if r.applied {
        out.push_str(&format!("{n} {moves} applied\n"));
    } else {
        out.push_str(&format!("{n} {moves} planned (dry run: nothing changed)\n"));
    }
    out
}

/// The reply to `maintenance`.
pub fn render_maintenance(on: bool) -> String {
    format!("maintenance {}\n", if on { "on" } else { "off" })
}

/// One drain progress message as a line, or as a JSON line.
pub fn drain_line(p: &DrainProgress, json: bool) -> String {
    let row = drain_row(p);
    if json {
        return serde_json::to_string(&row).unwrap_or_default();
    }
    let mut line = format!("{}: {} moved, {} remaining", row.node, row.slices_moved, row.slices_remaining);
    if row.done {
        line.push_str(", done");
    }
    if let Some(message) = &row.message {
        line.push_str(&format!(" ({message})"));
    }
    line
}

/// One event as a line (time, kind, then the fields it has), or as a JSON line.
pub fn event_line(e: &Event, json: bool) -> String {
    let row = event_row(e);
    if json {
        return serde_json::to_string(&row).unwrap_or_default();
    }
    let mut line = format!("{}  {:<14}", row.time, row.kind);
    if let Some(node) = &row.node {
        line.push_str(&format!(" node={node}"));
    }
    match (&row.queue, row.slice) {
        (Some(queue), Some(slice)) => line.push_str(&format!(" slice={queue}/{slice}")),
        (Some(queue), None) => line.push_str(&format!(" queue={queue}")),
        _ => {}
    }
    if let Some(epoch) = row.epoch {
        line.push_str(&format!(" epoch={epoch}"));
    }
    if let Some(message) = &row.message {
        line.push_str(&format!(" {message}"));
    }
    line.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::sync::{Arc, Mutex};

    use qslice_proto::admin::admin_server::{self, AdminServer};
    use qslice_proto::admin::*;
    use tonic::codegen::tokio_stream::{self, Stream, StreamExt};
    use tonic::{Response, Status};

    use super::*;

    #[test]
    fn addresses_without_a_scheme_mean_http_and_keep_their_order() {
        let got = parse_addresses(" c1:7700, https://c2.example:7700/ ,HTTP://[::1]:7700,,").expect("valid list");
        assert_eq!(got, vec!["http://c1:7700", "https://c2.example:7700", "http://[::1]:7700"]);
        assert_eq!(parse_addresses(DEFAULT_COORDINATOR).expect("default"), vec![DEFAULT_COORDINATOR]);
    }

    #[test]
    fn bad_addresses_are_refused_with_the_entry_named() {
        for bad in ["ftp://c1:21", "http://", "https:///", "c1:7700/admin", "c 1:7700", "c1:7700?x=1"] {
            let err = parse_addresses(&format!("c0:7700,{bad}")).expect_err(bad);
            assert!(matches!(err, CtlError::ParseAddress { ref address, .. } if address == bad), "{bad}: {err}");
        }
        assert!(matches!(parse_addresses(" , "), Err(CtlError::NoAddress)));
    }

    /// A scripted attempt: what each address does, and the order they were tried in.
    async fn run_fallback(script: &[(&str, Result<&str, AttemptError>)]) -> (Result<String, CtlError>, Vec<String>) {
        let addresses: Vec<String> = script.iter().map(|(a, _)| a.to_string()).collect();
        let tried = RefCell::new(Vec::new());
        let outcome = |address: &str| match &script.iter().find(|(a, _)| *a == address).expect("scripted").1 {
            Ok(answer) => Ok(answer.to_string()),
            Err(AttemptError::Connect(why)) => Err(AttemptError::Connect(why.clone())),
            Err(AttemptError::Rpc(s)) => Err(AttemptError::Rpc(Status::new(s.code(), s.message()))),
        };
        let result = first_answering(&addresses, |address| {
            tried.borrow_mut().push(address.clone());
            let reply = outcome(&address);
            async move { reply }
        })
        .await;
        (result, tried.into_inner())
    }

    #[tokio::test]
    async fn fallback_skips_unreachable_and_unavailable_coordinators_in_order() {
        let (result, tried) = run_fallback(&[
            ("http://a", Err(AttemptError::Connect("connection refused".into()))),
            ("http://b", Err(AttemptError::Rpc(Status::unavailable("etcd unreachable")))),
            ("http://c", Ok("from c")),
            ("http://d", Ok("from d")),
        ])
        .await;
        assert_eq!(result.expect("c answers"), "from c");
        assert_eq!(tried, vec!["http://a", "http://b", "http://c"], "d is never tried once c answered");
    }

    #[tokio::test]
    async fn fallback_stops_at_an_error_that_is_an_answer() {
        let (result, tried) = run_fallback(&[
            ("http://a", Err(AttemptError::Rpc(Status::not_found("queue \"x\" does not exist")))),
            ("http://b", Ok("from b")),
        ])
        .await;
        let err = result.expect_err("NOT_FOUND is final");
        assert_eq!(err.to_string(), "NOT_FOUND: queue \"x\" does not exist");
        assert_eq!(tried, vec!["http://a"]);
    }

    #[tokio::test]
    async fn fallback_names_every_address_when_none_answers() {
        let (result, tried) = run_fallback(&[
            ("http://a", Err(AttemptError::Connect("connection refused".into()))),
            ("http://b", Err(AttemptError::Rpc(Status::unavailable("etcd unreachable")))),
        ])
        .await;
        let err = result.expect_err("nobody answers").to_string();
        assert_eq!(
            err,
            "no coordinator answered: http://a: connection refused; http://b: UNAVAILABLE: etcd unreachable"
        );
        assert_eq!(tried.len(), 2);
    }

    #[test]
    fn status_codes_print_with_their_grpc_names() {
        assert_eq!(code_name(Code::PermissionDenied), "PERMISSION_DENIED");
        assert_eq!(code_name(Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(describe_status(&Status::unauthenticated("")), "UNAUTHENTICATED");
        let err = CtlError::Rpc(Status::invalid_argument("slices: must be a power of two"));
        assert_eq!(err.to_string(), "INVALID_ARGUMENT: slices: must be a power of two");
    }

    #[test]
    fn the_token_goes_into_the_authorization_header() {
        let mut with = BearerToken::new(Some("s3cret")).expect("valid token");
        let req = with.call(Request::new(())).expect("intercepted");
        assert_eq!(req.metadata().get("authorization").and_then(|v| v.to_str().ok()), Some("Bearer s3cret"));

        for none in [None, Some(""), Some("  ")] {
            let mut without = BearerToken::new(none).expect("no token");
            let req = without.call(Request::new(())).expect("intercepted");
            assert!(req.metadata().get("authorization").is_none(), "{none:?} sends no header");
        }
        assert!(matches!(BearerToken::new(Some("a\nb")), Err(CtlError::BadToken)));
    }

    #[test]
    fn https_needs_a_ca_and_http_needs_no_tls() {
        let http = vec!["http://c1:7700".to_owned()];
        assert!(tls_config(&http, &TlsFiles::default()).expect("plain").is_none());
        let https = vec!["http://c1:7700".to_owned(), "https://c2:7700".to_owned()];
        let err = tls_config(&https, &TlsFiles::default()).expect_err("no CA");
        assert!(matches!(err, CtlError::MissingCa { ref address } if address == "https://c2:7700"), "{err}");
        let missing = TlsFiles { ca: Some("/nonexistent/ca.pem".into()), ..TlsFiles::default() };
        assert!(matches!(tls_config(&https, &missing), Err(CtlError::ReadTlsFile { .. })));
    }

    fn node(id: &str, cordoned: bool, queues: &[&str]) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            host: format!("{id}.example"),
            weight: 1,
            queues: queues.iter().map(|q| q.to_string()).collect(),
            cordoned,
            incarnation: "inc-1".into(),
            age_seconds: 185,
            slices_held: 4,
            version: "0.1.0".into(),
            metrics_address: String::new(),
        }
    }

    fn status_reply() -> GetStatusResponse {
        GetStatusResponse {
            cluster: "prod".into(),
            leader: Some(CoordinatorInfo { id: "coord-a".into(), admin_address: "http://a:7700".into() }),
            standbys: vec![CoordinatorInfo { id: "coord-b".into(), admin_address: "http://b:7700".into() }],
            nodes: vec![node("n1", false, &[]), node("node-two", true, &["in", "out"])],
            queues: vec![
                // A coordinator too old to send the state: the client works it out.
                QueueInfo { name: "in".into(), slices: 4, paused: false, mailman3: false, old_slicing_claims: 0, ..QueueInfo::default() },
                QueueInfo { name: "out".into(), slices: 8, paused: true, mailman3: true, state: "paused".into(), ..QueueInfo::default() },
                QueueInfo {
                    name: "bounces".into(),
                    slices: 1,
                    no_eligible_node: true,
                    refused_by: vec!["n1".into()],
                    state: "no eligible node (refused by n1; cordoned: node-two)".into(),
                    ..QueueInfo::default()
                },
            ],
            slices: vec![
                SliceInfo {
                    queue: "in".into(),
                    slice: 0,
                    desired_owner: "n1".into(),
                    claim_holder: "n1".into(),
                    epoch: 42,
                    depth: 3,
                    oldest_entry_age_seconds: 185.0,
                    unowned_seconds: 0.0,
                    pinned: true,
                    in_flight: 1,
                    oldest_in_flight_age_seconds: 725.0,
                    in_flight_too_long: true,
                    no_eligible_node: false,
                },
                SliceInfo {
                    queue: "in".into(),
                    slice: 1,
                    desired_owner: "n1".into(),
                    claim_holder: String::new(),
                    epoch: 0,
                    depth: 0,
                    oldest_entry_age_seconds: 0.0,
                    unowned_seconds: 12.0,
                    pinned: false,
                    in_flight: 2,
                    oldest_in_flight_age_seconds: 4.0,
                    ..SliceInfo::default()
                },
                SliceInfo { queue: "bounces".into(), slice: 0, desired_owner: String::new(), unowned_seconds: 30.0, no_eligible_node: true, ..SliceInfo::default() },
            ],
            maintenance: true,
            alerts: vec!["slice in/1 unowned for 12s".into()],
        }
    }

    #[test]
    fn status_renders_a_summary_and_aligned_tables() {
        let text = render_status(&status_view(&status_reply(), true));
        let expected = "\
cluster:     prod
leader:      coord-a (http://a:7700)
standbys:    coord-b (http://b:7700)
maintenance: on
alert:       slice in/1 unowned for 12s

NODE      HOST              STATE     WEIGHT  SLICES  QUEUES  AGE    VERSION
n1        n1.example        ready     1       4       *       3m05s  0.1.0
node-two  node-two.example  cordoned  1       4       in,out  3m05s  0.1.0

QUEUE    SLICES  MAILMAN  STATE
in       4       2.1      active
out      8       3        paused
bounces  1       2.1      no eligible node (refused by n1; cordoned: node-two)

QUEUE    SLICE  DESIRED      HOLDER  EPOCH  DEPTH  OLDEST  IN FLIGHT          UNOWNED
in       0      n1 (pinned)  n1      42     3      3m05s   12m05s (too long)  -
in       1      n1           -       -      0      -       4s                 12s
bounces  0      -            -       -      0      -       -                  30s (no eligible node)
";
        assert_eq!(text, expected);
        let without = render_status(&status_view(&status_reply(), false));
        assert!(!without.contains("DESIRED"), "no slice table unless asked for:\n{without}");
    }

    #[test]
    fn status_json_has_rows_and_omits_slices_unless_asked() {
        let json = serde_json::to_value(status_view(&status_reply(), false)).expect("serializes");
        assert_eq!(json["leader"]["id"], "coord-a");
        assert_eq!(json["nodes"][1]["cordoned"], true);
        assert_eq!(json["nodes"][0]["metrics_address"], serde_json::Value::Null);
        assert_eq!(json["queues"][1]["mailman3"], true);
        assert!(json.get("slices").is_none());
        let json = serde_json::to_value(status_view(&status_reply(), true)).expect("serializes");
        assert_eq!(json["slices"][0]["epoch"], 42);
        assert_eq!(json["slices"][1]["claim_holder"], serde_json::Value::Null);
        assert_eq!(json["slices"][1]["unowned_seconds"], 12.0);
        assert_eq!(json["slices"][0]["in_flight_too_long"], true);
        assert_eq!(json["slices"][0]["oldest_in_flight_age_seconds"], 725.0);
        assert_eq!(json["queues"][0]["state"], "active");
        assert_eq!(json["queues"][2]["no_eligible_node"], true);
        assert_eq!(json["queues"][2]["refused_by"], serde_json::json!(["n1"]));
    }

    #[test]
    fn a_leaderless_cluster_says_so() {
        let reply = GetStatusResponse::default();
        let text = render_status(&status_view(&reply, false));
        assert!(text.contains("leader:      none\n") && text.contains("standbys:    none\n"), "{text}");
    }

    #[test]
    fn rebalance_lists_moves_with_reasons_and_says_whether_applied() {
        let reply = RebalanceResponse {
            moves: vec![PlannedMove {
                slice: Some(SliceRef { queue: "in".into(), slice: 3 }),
                from_node: "n1".into(),
                to_node: "n2".into(),
                reason: "n1 above its weighted share".into(),
            }],
            applied: false,
        };
        let view = rebalance_view(&reply);
        assert_eq!(
            render_rebalance(&view),
            "QUEUE  SLICE  FROM  TO  REASON\nin     3      n1    n2  n1 above its weighted share\n\
             1 move planned (dry run: nothing changed)\n"
        );
        let json = serde_json::to_value(&view).expect("serializes");
        assert_eq!(json["moves"][0]["to_node"], "n2");
        assert_eq!(json["applied"], false);
        assert_eq!(
            render_rebalance(&rebalance_view(&RebalanceResponse::default())),
            "no moves: the assignment is balanced\n"
        );
    }

    #[test]
    fn event_kinds_are_lower_case_names() {
        assert_eq!(event_kind_name(event::Kind::NodeJoined as i32), "node_joined");
        assert_eq!(event_kind_name(event::Kind::SliceOrphaned as i32), "slice_orphaned");
        assert_eq!(event_kind_name(event::Kind::LeaderChanged as i32), "leader_changed");
        assert_eq!(event_kind_name(event::Kind::Alert as i32), "alert");
        assert_eq!(event_kind_name(event::Kind::AlertCleared as i32), "alert_cleared");
        assert_eq!(event_kind_name(0), "unspecified");
        assert_eq!(event_kind_name(99), "unknown_99", "a kind newer than the client still prints");
    }

    #[test]
    fn events_print_as_lines_or_json_lines() {
        let e = Event {
            kind: event::Kind::SliceClaimed as i32,
            time_unix_ms: 1_700_000_000_123,
            node: "n1".into(),
            queue: "in".into(),
            slice: 0,
            epoch: 42,
            message: String::new(),
            whole_queue: false,
        };
        assert_eq!(event_line(&e, false), "2023-11-14T22:13:20.123Z  slice_claimed  node=n1 slice=in/0 epoch=42");
        let json: serde_json::Value = serde_json::from_str(&event_line(&e, true)).expect("one JSON line");
        assert_eq!(json["kind"], "slice_claimed");
        assert_eq!(json["slice"], 0);
        assert_eq!(json["message"], serde_json::Value::Null);
        let alert = Event { kind: event::Kind::Alert as i32, message: "etcd slow".into(), ..Event::default() };
        let row = event_row(&alert);
        assert_eq!((row.slice, row.epoch, row.node), (None, None, None), "no slice fields without a queue");
        let whole = Event { kind: event::Kind::Alert as i32, queue: "in".into(), whole_queue: true, message: "no eligible node".into(), ..Event::default() };
        assert_eq!(event_row(&whole).slice, None, "a queue alert names no slice");
        assert!(event_line(&whole, false).ends_with(&format!("{:<14} queue=in no eligible node", "alert")), "{}", event_line(&whole, false));
    }

    #[test]
    fn drain_progress_prints_as_lines_or_json_lines() {
        let p = DrainProgress {
            node: "n1".into(),
            slices_remaining: 0,
            slices_moved: 5,
            done: true,
            message: String::new(),
        };
        assert_eq!(drain_line(&p, false), "n1: 5 moved, 0 remaining, done");
        let json: serde_json::Value = serde_json::from_str(&drain_line(&p, true)).expect("one JSON line");
        assert_eq!((json["done"].clone(), json["slices_moved"].clone()), (true.into(), 5.into()));
    }

    #[test]
    fn tables_pad_by_characters_and_trim_line_ends() {
        let t = render_table(&["A", "LONG-HEADER"], &[vec!["äöü".into(), String::new()], vec!["x".into(), "y".into()]]);
        assert_eq!(t, "A    LONG-HEADER\näöü\nx    y\n");
    }

    // -----------------------------------------------------------------------------------
    // Against an in-process fake of the admin API: the wire behaviour of the client.

    /// A fake coordinator: answers ListNodes with `answer` (Ok = one node "n1"), streams a
    /// drain that finishes only for node "good", and two events then silence.
    struct Fake {
        /// `Code::Ok` to answer, or the code to fail with.
        answer: Code,
        /// The authorization header of every call, in order.
        seen: Arc<Mutex<Vec<Option<String>>>>,
    }

    impl Fake {
        fn record<T>(&self, request: &tonic::Request<T>) {
            let auth = request.metadata().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
            self.seen.lock().expect("lock").push(auth);
        }
    }

    type Boxed<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

    fn unimplemented<T>() -> Result<Response<T>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    #[tonic::async_trait]
    impl admin_server::Admin for Fake {
        async fn get_status(&self, _: tonic::Request<GetStatusRequest>) -> Result<Response<GetStatusResponse>, Status> {
            unimplemented()
        }
        async fn list_nodes(&self, r: tonic::Request<ListNodesRequest>) -> Result<Response<ListNodesResponse>, Status> {
            self.record(&r);
            match self.answer {
                Code::Ok => Ok(Response::new(ListNodesResponse { nodes: vec![node("n1", false, &[])] })),
                code => Err(Status::new(code, "fake says no")),
            }
        }
        async fn cordon_node(&self, _: tonic::Request<NodeRequest>) -> Result<Response<NodeResponse>, Status> {
            unimplemented()
        }
        async fn uncordon_node(&self, _: tonic::Request<NodeRequest>) -> Result<Response<NodeResponse>, Status> {
            unimplemented()
        }
        type DrainNodeStream = Boxed<DrainProgress>;
        async fn drain_node(
            &self,
            r: tonic::Request<DrainNodeRequest>,
        ) -> Result<Response<Self::DrainNodeStream>, Status> {
            let node = r.into_inner().node;
            let step = |moved, done| DrainProgress {
                node: node.clone(),
                slices_remaining: 2 - moved,
                slices_moved: moved,
                done,
                message: String::new(),
            };
            let steps = vec![Ok(step(1, false)), Ok(step(2, node == "good"))];
            Ok(Response::new(Box::pin(tokio_stream::iter(steps))))
        }
        async fn list_queues(
            &self,
            _: tonic::Request<ListQueuesRequest>,
        ) -> Result<Response<ListQueuesResponse>, Status> {
            unimplemented()
        }
        async fn put_queue(&self, _: tonic::Request<PutQueueRequest>) -> Result<Response<QueueResponse>, Status> {
            unimplemented()
        }
        async fn delete_queue(&self, _: tonic::Request<QueueRequest>) -> Result<Response<QueueResponse>, Status> {
            unimplemented()
        }
        async fn pause_queue(&self, _: tonic::Request<QueueRequest>) -> Result<Response<QueueResponse>, Status> {
            unimplemented()
        }
        async fn resume_queue(&self, _: tonic::Request<QueueRequest>) -> Result<Response<QueueResponse>, Status> {
            unimplemented()
        }
        async fn move_slice(&self, _: tonic::Request<MoveSliceRequest>) -> Result<Response<MoveSliceResponse>, Status> {
            unimplemented()
        }
        async fn pin_slice(&self, _: tonic::Request<PinSliceRequest>) -> Result<Response<PinSliceResponse>, Status> {
            unimplemented()
        }
        async fn unpin_slice(&self, _: tonic::Request<SliceRef>) -> Result<Response<PinSliceResponse>, Status> {
            unimplemented()
        }
        async fn rebalance(&self, _: tonic::Request<RebalanceRequest>) -> Result<Response<RebalanceResponse>, Status> {
            unimplemented()
        }
        async fn set_maintenance(
            &self,
            _: tonic::Request<SetMaintenanceRequest>,
        ) -> Result<Response<SetMaintenanceResponse>, Status> {
            unimplemented()
        }
        type WatchEventsStream = Boxed<Event>;
        async fn watch_events(
            &self,
            _: tonic::Request<WatchEventsRequest>,
        ) -> Result<Response<Self::WatchEventsStream>, Status> {
            let events = (1..=2).map(|i| Ok(Event { kind: i, ..Event::default() }));
            Ok(Response::new(Box::pin(tokio_stream::iter(events).chain(tokio_stream::pending()))))
        }
    }

    /// Serves a fake on a free local port; returns its address and the headers it saw.
    async fn serve_fake(answer: Code) -> (String, Arc<Mutex<Vec<Option<String>>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = format!("127.0.0.1:{}", listener.local_addr().expect("addr").port());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let fake = Fake { answer, seen: seen.clone() };
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(
            tonic::transport::Server::builder().add_service(AdminServer::new(fake)).serve_with_incoming(incoming),
        );
        (address, seen)
    }

    /// An address where nothing listens (a port just bound and released).
    async fn refused_address() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        format!("127.0.0.1:{}", listener.local_addr().expect("addr").port())
    }

    fn admin(addresses: &[&String], token: Option<&str>) -> Admin {
        let list = addresses.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(",");
        Admin::new(&ClientOptions {
            addresses: parse_addresses(&list).expect("addresses"),
            token: token.map(str::to_owned),
            tls: TlsFiles::default(),
            timeout: Duration::from_secs(5),
        })
        .expect("options")
    }

    #[tokio::test]
    async fn a_call_reaches_the_first_coordinator_that_answers_with_the_token() {
        let dead = refused_address().await;
        let (unavailable, seen_unavailable) = serve_fake(Code::Unavailable).await;
        let (good, seen_good) = serve_fake(Code::Ok).await;
        let (spare, seen_spare) = serve_fake(Code::Ok).await;
        let nodes = admin(&[&dead, &unavailable, &good, &spare], Some("s3cret")).nodes().await.expect("good answers");
        assert_eq!(nodes.len(), 1);
        assert_eq!(*seen_unavailable.lock().expect("lock"), vec![Some("Bearer s3cret".to_owned())]);
        assert_eq!(*seen_good.lock().expect("lock"), vec![Some("Bearer s3cret".to_owned())]);
        assert!(seen_spare.lock().expect("lock").is_empty(), "no call after an answer");
    }

    #[tokio::test]
    async fn a_refusal_from_a_coordinator_is_final() {
        let (denied, _) = serve_fake(Code::PermissionDenied).await;
        let (good, seen_good) = serve_fake(Code::Ok).await;
        let err = admin(&[&denied, &good], None).nodes().await.expect_err("denied is an answer");
        assert_eq!(err.to_string(), "PERMISSION_DENIED: fake says no");
        assert!(seen_good.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn drain_succeeds_only_when_the_last_message_says_done() {
        let (address, _) = serve_fake(Code::Ok).await;
        let admin = admin(&[&address], None);
        let mut lines = Vec::new();
        admin.drain("good", 0, |p| lines.push(drain_line(p, false))).await.expect("drained");
        assert_eq!(lines, vec!["good: 1 moved, 1 remaining", "good: 2 moved, 0 remaining, done"]);
        let err = admin.drain("stuck", 0, |_| {}).await.expect_err("never done");
        assert!(matches!(err, CtlError::DrainUnfinished { .. }), "{err}");
    }

    #[tokio::test]
    async fn events_without_follow_print_what_arrives_and_stop() {
        let (address, _) = serve_fake(Code::Ok).await;
        let mut kinds = Vec::new();
        let started = tokio::time::Instant::now();
        admin(&[&address], None)
            .watch_events(Some(Duration::from_millis(300)), |e| kinds.push(event_kind_name(e.kind)))
            .await
            .expect("window ends cleanly");
        assert_eq!(kinds, vec!["node_joined", "node_left"]);
        assert!(started.elapsed() < Duration::from_secs(3), "the stream stays open, the window ends it");
    }
}
