//! The admin client: addresses and fallback, the bearer token, TLS, and the calls.
//! See [`crate::ctl`] for the contract.

use qslice_common::etcd::causes;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use qslice_proto::admin::admin_client::AdminClient;
use qslice_proto::admin::{
    DrainNodeRequest, DrainProgress, Event, ExplainSliceResponse, GetStatusRequest, GetStatusResponse, ListNodesRequest, ListQueuesRequest, MoveSliceRequest, NodeInfo,
    NodeRequest, PinSliceRequest, PinSliceResponse, PutQueueRequest, QueueInfo, QueueRequest, RebalanceRequest, RebalanceResponse, SetMaintenanceRequest, SliceRef,
    WatchEventsRequest,
};
use tonic::codegen::http::Uri;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status, Streaming};

use super::rows::{MoveRow, PinRow};
use crate::status_rows::non_empty;

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
    let addresses = list.split(',').map(str::trim).filter(|a| !a.is_empty()).map(normalize_address).collect::<Result<Vec<_>, _>>()?;
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
    let read = |path: &PathBuf| std::fs::read(path).map_err(|source| CtlError::ReadTlsFile { path: path.clone(), source });
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
        let mut endpoint = Endpoint::from_shared(address.to_owned()).map_err(|e| AttemptError::Connect(causes(&e)))?.connect_timeout(self.timeout);
        if let (true, Some(tls)) = (address.starts_with("https://"), &self.tls) {
            endpoint = endpoint.tls_config(tls.clone()).map_err(|e| AttemptError::Connect(causes(&e)))?;
        }
        let channel = endpoint.connect().await.map_err(|e| AttemptError::Connect(causes(&e)))?;
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
                Err(_) => Err(AttemptError::Rpc(Status::deadline_exceeded(format!("{address} did not answer within {}", humantime::format_duration(this.timeout))))),
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
        Ok(MoveRow { queue: queue.to_owned(), slice, from_node: non_empty(&reply.from_node), to_node: non_empty(&reply.to_node), reason: None })
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

    /// ExplainSlice: why one slice is (not) being processed.
    pub async fn explain(&self, queue: &str, slice: u32) -> Result<ExplainSliceResponse, CtlError> {
        self.call(|mut c| async move { c.explain_slice(slice_ref(queue, slice)).await }).await
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
    pub async fn drain(&self, node: &str, timeout_seconds: u32, mut emit: impl FnMut(&DrainProgress)) -> Result<(), CtlError> {
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

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::sync::{Arc, Mutex};

    use qslice_proto::admin::admin_server::{self, AdminServer};
    use qslice_proto::admin::*;
    use tonic::codegen::tokio_stream::{self, Stream, StreamExt};
    use tonic::{Response, Status};

    use super::*;
    use crate::ctl::render::drain_line;
    use crate::ctl::rows::event_kind_name;
    use crate::status_rows::fixtures::node;

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
        let (result, tried) = run_fallback(&[("http://a", Err(AttemptError::Rpc(Status::not_found("queue \"x\" does not exist")))), ("http://b", Ok("from b"))]).await;
        let err = result.expect_err("NOT_FOUND is final");
        assert_eq!(err.to_string(), "NOT_FOUND: queue \"x\" does not exist");
        assert_eq!(tried, vec!["http://a"]);
    }

    #[tokio::test]
    async fn fallback_names_every_address_when_none_answers() {
        let (result, tried) =
            run_fallback(&[("http://a", Err(AttemptError::Connect("connection refused".into()))), ("http://b", Err(AttemptError::Rpc(Status::unavailable("etcd unreachable"))))])
                .await;
        let err = result.expect_err("nobody answers").to_string();
        assert_eq!(err, "no coordinator answered: http://a: connection refused; http://b: UNAVAILABLE: etcd unreachable");
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
        async fn drain_node(&self, r: tonic::Request<DrainNodeRequest>) -> Result<Response<Self::DrainNodeStream>, Status> {
            let node = r.into_inner().node;
            let step = |moved, done| DrainProgress { node: node.clone(), slices_remaining: 2 - moved, slices_moved: moved, done, message: String::new() };
            let steps = vec![Ok(step(1, false)), Ok(step(2, node == "good"))];
            Ok(Response::new(Box::pin(tokio_stream::iter(steps))))
        }
        async fn list_queues(&self, _: tonic::Request<ListQueuesRequest>) -> Result<Response<ListQueuesResponse>, Status> {
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
        async fn set_maintenance(&self, _: tonic::Request<SetMaintenanceRequest>) -> Result<Response<SetMaintenanceResponse>, Status> {
            unimplemented()
        }
        async fn explain_slice(&self, _: tonic::Request<SliceRef>) -> Result<Response<ExplainSliceResponse>, Status> {
            unimplemented()
        }
        type WatchEventsStream = Boxed<Event>;
        async fn watch_events(&self, _: tonic::Request<WatchEventsRequest>) -> Result<Response<Self::WatchEventsStream>, Status> {
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
        tokio::spawn(tonic::transport::Server::builder().add_service(AdminServer::new(fake)).serve_with_incoming(incoming));
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
        admin(&[&address], None).watch_events(Some(Duration::from_millis(300)), |e| kinds.push(event_kind_name(e.kind))).await.expect("window ends cleanly");
        assert_eq!(kinds, vec!["node_joined", "node_left"]);
        assert!(started.elapsed() < Duration::from_secs(3), "the stream stays open, the window ends it");
    }
}
