//! qslice-runner: claims slices of a shared Mailman spool and processes them.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;
use qslice_common::health::Readiness;
use qslice_runner::config::{Args, Config};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let args = Args::parse();
    if args.leash {
        return qslice_runner::leash::main();
    }
    let cfg = match Config::resolve(&args) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("qslice-runner: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        for w in cfg.warnings() {
            eprintln!("warning: {w}");
        }
        println!("{}", toml::to_string(&cfg).unwrap_or_else(|e| format!("(cannot print: {e})")));
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    qslice_common::daemon::init_logging(cfg.log_format);
    for w in cfg.warnings() {
        tracing::warn!("{w}");
    }
    qslice_common::daemon::block_on("qslice-runner", async_main(cfg))
}

async fn async_main(cfg: Config) -> ExitCode {
    let shutdown = CancellationToken::new();
    let ready = Arc::new(AtomicBool::new(false));
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder();
    if let (Some(addr), Ok(handle)) = (cfg.metrics_addr, recorder) {
        let shutdown = shutdown.clone();
        let ready = ready.clone();
        let readiness: Readiness = Arc::new(move || if ready.load(Ordering::SeqCst) { Ok("ready\n") } else { Err("not ready: not registered or assignment not read\n") });
        let routes = qslice_common::health::routes(Some(handle), readiness);
        tokio::spawn(async move {
            if let Err(e) = qslice_common::health::serve(addr, routes, "/metrics, /healthz and /readyz", shutdown).await {
                tracing::error!(%addr, error = %e, "cannot serve metrics");
            }
        });
    }
    tokio::spawn(qslice_common::daemon::watch_signals(
        shutdown.clone(),
        "stop signal: finishing in-flight work, releasing slices (send it again to exit at once)",
        "second stop signal: exiting now; in-flight entries stay .bak for recovery",
    ));
    {
        // systemd (Type=notify): ready once registered with the assignment read, the same
        // condition as /readyz.
        let ready = ready.clone();
        let is_ready = move || std::future::ready(ready.load(Ordering::SeqCst));
        tokio::spawn(qslice_common::notify::run(is_ready, shutdown.clone()));
    }
    tracing::info!(node = %cfg.node_id, cluster = %cfg.cluster, spool = %cfg.spool.display(), "qslice-runner starting");
    match qslice_runner::daemon::run(cfg, shutdown, ready).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "qslice-runner stopped");
            ExitCode::from(1)
        }
    }
}
