//! The gRPC admin service: converts messages and maps errors; decisions live in
//! [`crate::admin`]. Also serves grpc.health.v1 and server reflection.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use qslice_proto::admin::admin_server::{Admin as AdminApi, AdminServer};
use qslice_proto::admin::*;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

use crate::admin::{Access, Admin, AdminError};
use crate::config::AdminConfig;

impl From<AdminError> for Status {
    fn from(e: AdminError) -> Status {
        let message = e.to_string();
        match e {
            AdminError::Unauthenticated => Status::unauthenticated(message),
            AdminError::PermissionDenied => Status::permission_denied(message),
            AdminError::NotFound { .. } => Status::not_found(message),
            AdminError::Invalid { .. } => Status::invalid_argument(message),
            AdminError::FailedPrecondition(_) => Status::failed_precondition(message),
            AdminError::Etcd(_) | AdminError::NotReady => Status::unavailable(message),
        }
    }
}

/// The tonic face of [`Admin`].
pub struct AdminService {
    admin: Arc<Admin>,
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl AdminService {
    fn check<T>(&self, request: &Request<T>, access: Access) -> Result<(), Status> {
        let auth = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        self.admin.authorize(auth, access).map_err(Status::from)
    }
}

#[tonic::async_trait]
impl AdminApi for AdminService {
    async fn get_status(&self, request: Request<GetStatusRequest>) -> Result<Response<GetStatusResponse>, Status> {
        self.check(&request, Access::Read)?;
        Ok(Response::new(self.admin.status(request.get_ref().include_slices)?))
    }

    async fn list_nodes(&self, request: Request<ListNodesRequest>) -> Result<Response<ListNodesResponse>, Status> {
        self.check(&request, Access::Read)?;
        Ok(Response::new(ListNodesResponse { nodes: self.admin.nodes()? }))
    }

    async fn cordon_node(&self, request: Request<NodeRequest>) -> Result<Response<NodeResponse>, Status> {
        self.check(&request, Access::Mutate)?;
        Ok(Response::new(NodeResponse { node: Some(self.admin.cordon(&request.get_ref().node).await?) }))
    }

    async fn uncordon_node(&self, request: Request<NodeRequest>) -> Result<Response<NodeResponse>, Status> {
        self.check(&request, Access::Mutate)?;
        Ok(Response::new(NodeResponse { node: Some(self.admin.uncordon(&request.get_ref().node).await?) }))
    }

    type DrainNodeStream = Stream_<DrainProgress>;

    async fn drain_node(&self, request: Request<DrainNodeRequest>) -> Result<Response<Self::DrainNodeStream>, Status> {
        self.check(&request, Access::Mutate)?;
        let r = request.get_ref();
        let stream = self.admin.drain(&r.node, Duration::from_secs(u64::from(r.timeout_seconds))).await?;
        Ok(Response::new(Box::pin(stream.map(|p| p.map_err(Status::from)))))
    }

    async fn list_queues(&self, request: Request<ListQueuesRequest>) -> Result<Response<ListQueuesResponse>, Status> {
        self.check(&request, Access::Read)?;
        Ok(Response::new(ListQueuesResponse { queues: self.admin.queues()? }))
    }

    async fn put_queue(&self, request: Request<PutQueueRequest>) -> Result<Response<QueueResponse>, Status> {
        self.check(&request, Access::Mutate)?;
        let r = request.get_ref();
        Ok(Response::new(QueueResponse { queue: Some(self.admin.put_queue(&r.name, r.slices, r.mailman3).await?) }))
    }

    async fn delete_queue(&self, request: Request<QueueRequest>) -> Result<Response<QueueResponse>, Status> {
        self.check(&request, Access::Mutate)?;
        Ok(Response::new(QueueResponse { queue: Some(self.admin.delete_queue(&request.get_ref().name).await?) }))
    }

    async fn pause_queue(&self, request: Request<QueueRequest>) -> Result<Response<QueueResponse>, Status> {
        self.check(&request, Access::Mutate)?;
        Ok(Response::new(QueueResponse { queue: Some(self.admin.set_paused(&request.get_ref().name, true).await?) }))
    }

    async fn resume_queue(&self, request: Request<QueueRequest>) -> Result<Response<QueueResponse>, Status> {
        self.check(&request, Access::Mutate)?;
        Ok(Response::new(QueueResponse { queue: Some(self.admin.set_paused(&request.get_ref().name, false).await?) }))
    }

    async fn move_slice(&self, request: Request<MoveSliceRequest>) -> Result<Response<MoveSliceResponse>, Status> {
        self.check(&request, Access::Mutate)?;
        let r = request.get_ref();
        let (from_node, to_node) = self.admin.move_slice(r.slice.as_ref(), &r.target_node).await?;
        Ok(Response::new(MoveSliceResponse { from_node, to_node }))
    }

    async fn pin_slice(&self, request: Request<PinSliceRequest>) -> Result<Response<PinSliceResponse>, Status> {
        self.check(&request, Access::Mutate)?;
        let r = request.get_ref();
        let (slice, node) = self.admin.pin(r.slice.as_ref(), &r.node).await?;
        Ok(Response::new(PinSliceResponse { slice: Some(slice), node }))
    }

    async fn unpin_slice(&self, request: Request<SliceRef>) -> Result<Response<PinSliceResponse>, Status> {
        self.check(&request, Access::Mutate)?;
        let (slice, node) = self.admin.unpin(Some(request.get_ref())).await?;
        Ok(Response::new(PinSliceResponse { slice: Some(slice), node }))
    }

    async fn rebalance(&self, request: Request<RebalanceRequest>) -> Result<Response<RebalanceResponse>, Status> {
        self.check(&request, Access::rebalance(request.get_ref().dry_run))?;
        Ok(Response::new(self.admin.rebalance(request.get_ref().dry_run).await?))
    }

    async fn set_maintenance(&self, request: Request<SetMaintenanceRequest>) -> Result<Response<SetMaintenanceResponse>, Status> {
        self.check(&request, Access::Mutate)?;
        Ok(Response::new(SetMaintenanceResponse { on: self.admin.set_maintenance(request.get_ref().on).await? }))
    }

    async fn explain_slice(&self, request: Request<SliceRef>) -> Result<Response<ExplainSliceResponse>, Status> {
        self.check(&request, Access::Read)?;
        Ok(Response::new(self.admin.explain(Some(request.get_ref())).await?))
    }

    type WatchEventsStream = Stream_<Event>;

    async fn watch_events(&self, request: Request<WatchEventsRequest>) -> Result<Response<Self::WatchEventsStream>, Status> {
        self.check(&request, Access::Read)?;
        // A subscriber that falls more than the buffer behind skips what it missed.
        let stream = tokio_stream::wrappers::BroadcastStream::new(self.admin.events()).filter_map(|e| e.ok().map(Ok));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Why the admin API could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A TLS file could not be read.
    #[error("cannot read admin TLS file {path}: {source}")]
    ReadTlsFile {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The server failed (bind, TLS setup).
    #[error("admin API on {addr}: {source}")]
    Serve {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// Reflection could not be built from the descriptor set.
    #[error("server reflection: {0}")]
    Reflection(String),
}

/// Serves the admin API, health and reflection on `cfg.addr` until `shutdown`.
pub async fn serve(admin: Arc<Admin>, cfg: &AdminConfig, shutdown: CancellationToken) -> Result<(), ServeError> {
    let read = |path: &std::path::Path| std::fs::read(path).map_err(|source| ServeError::ReadTlsFile { path: path.to_owned(), source });
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<AdminServer<AdminService>>().await;
    let reflection =
        tonic_reflection::server::Builder::configure().register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET).build_v1().map_err(|e| ServeError::Reflection(e.to_string()))?;
    let mut builder = Server::builder();
    if let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) {
        let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
        if let Some(ca) = &cfg.client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
        }
        builder = builder.tls_config(tls).map_err(|source| ServeError::Serve { addr: cfg.addr, source })?;
    }
    tracing::info!(addr = %cfg.addr, tls = cfg.tls_cert.is_some(), token = cfg.token.is_some(), "serving the admin API");
    builder
        .add_service(AdminServer::new(AdminService { admin }))
        .add_service(health)
        .add_service(reflection)
        .serve_with_shutdown(cfg.addr, shutdown.cancelled_owned())
        .await
        .map_err(|source| ServeError::Serve { addr: cfg.addr, source })
}
