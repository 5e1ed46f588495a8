//! qslice-coordinator: leader election and slice assignment.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use qslice_coordinator::admin::Admin;
use qslice_coordinator::cache::ClusterCache;
use qslice_coordinator::config::{Args, Config};
use qslice_coordinator::dashboard::{Dashboard, HttpProtection};
use qslice_coordinator::leader::LeaderState;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = match Config::resolve(&args) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("qslice-coordinator: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        println!("{}", toml::to_string(&cfg).unwrap_or_else(|e| format!("(cannot print: {e})")));
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    qslice_common::daemon::init_logging(cfg.log_format);
    qslice_common::daemon::block_on("qslice-coordinator", async_main(cfg))
}

async fn async_main(cfg: Config) -> ExitCode {
    let shutdown = CancellationToken::new();
    let state = Arc::new(LeaderState::default());
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder().ok();
    // The HTTP endpoint comes up before etcd answers (/healthz, /metrics); the dashboard's
    // data once the admin state is attached below.
    // It takes the admin API's token (when reads are protected) and TLS files.
    let protection = HttpProtection::of_admin(&cfg.admin);
    let dashboard = Dashboard::new(state.clone(), recorder, protection.read_token.clone());
    if let Some(addr) = cfg.http_addr {
        let (dashboard, shutdown) = (dashboard.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = dashboard.serve(addr, protection.tls, shutdown).await {
                tracing::error!(%addr, error = %e, "cannot serve the dashboard and metrics");
            }
        });
    }
    tokio::spawn(qslice_common::daemon::watch_signals(shutdown.clone(), "stop signal: resigning leadership (send it again to exit at once)", "second stop signal: exiting now"));
    tracing::info!(id = %cfg.id, cluster = %cfg.cluster, "qslice-coordinator starting");
    let keys = match qslice_proto::keys::Keys::new(&cfg.cluster) {
        Ok(k) => k,
        Err(e) => {
            tracing::error!(error = %e, "invalid cluster name");
            return ExitCode::from(2);
        }
    };
    let cache = Arc::new(ClusterCache::with_alerts(keys.clone(), cfg.alert_settings()));
    {
        // systemd (Type=notify): leader and standbys alike are ready once they have read
        // the cluster and their admin API accepts connections.
        let (cache, admin_addr) = (cache.clone(), cfg.admin.addr);
        let is_ready = move || {
            let listed = cache.is_listed();
            async move { listed && accepts_connections(admin_addr).await }
        };
        tokio::spawn(qslice_common::notify::run(is_ready, shutdown.clone()));
    }
    let client = match qslice_common::etcd::connect_when_ready(&cfg.etcd, &shutdown).await {
        Ok(c) => c,
        Err(qslice_common::etcd::EtcdError::Cancelled) => return ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "cannot use etcd");
            return ExitCode::from(1);
        }
    };
    {
        let (cache, client, shutdown) = (cache.clone(), client.clone(), shutdown.clone());
        tokio::spawn(async move { cache.run(client, shutdown).await });
    }
    let admin = Arc::new(Admin::new(client.clone(), keys, cache.clone(), cfg.admin.clone()));
    dashboard.attach(admin.clone(), cache.clone(), shutdown.clone());
    let server = {
        let (admin_cfg, shutdown) = (cfg.admin.clone(), shutdown.clone());
        tokio::spawn(async move {
            let result = qslice_coordinator::service::serve(admin, &admin_cfg, shutdown.clone()).await;
            if let Err(e) = &result {
                // A coordinator whose admin API cannot be reached is not one to run.
                tracing::error!(error = %e, "the admin API failed; stopping");
                shutdown.cancel();
            }
            result
        })
    };
    let result = qslice_coordinator::leader::run(cfg, client, cache, shutdown.clone(), state).await;
    shutdown.cancel();
    let served = server.await;
    match (result, served) {
        (Err(e), _) => {
            tracing::error!(error = %e, "qslice-coordinator stopped");
            ExitCode::from(1)
        }
        (Ok(()), Ok(Err(_))) => ExitCode::from(1),
        _ => ExitCode::SUCCESS,
    }
}

/// Whether a TCP connection to `addr` (the loopback address for a wildcard one) opens
/// within a second: the admin API serves.
async fn accepts_connections(addr: SocketAddr) -> bool {
    let mut probe = addr;
    if probe.ip().is_unspecified() {
        probe.set_ip(match addr {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    matches!(tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(probe)).await, Ok(Ok(_)))
}
