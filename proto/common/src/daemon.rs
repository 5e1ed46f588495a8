//! What qslice's daemons share in their `main`: logging setup and stop signals.

use tokio_util::sync::CancellationToken;

use crate::config::LogFormat;

/// Logs to stderr as text or JSON lines, filtered by RUST_LOG (default `info`); colours
/// only on a terminal, so log files and journald get plain text.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The first SIGTERM or SIGINT cancels `shutdown` (logging `first`); a second one exits at
/// once with status 130 (logging `second`).
pub async fn watch_signals(shutdown: CancellationToken, first: &'static str, second: &'static str) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    let mut count = 0;
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        count += 1;
        if count == 1 {
            tracing::info!("{first}");
            shutdown.cancel();
        } else {
            tracing::warn!("{second}");
            std::process::exit(130);
        }
    }
}

/// Runs a daemon's async `main` on a multi-threaded runtime; a runtime that cannot start
/// is an error on stderr, named after the daemon, and exit status 1.
pub fn block_on(daemon: &str, main: impl std::future::Future<Output = std::process::ExitCode>) -> std::process::ExitCode {
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(main),
        Err(e) => {
            eprintln!("{daemon}: cannot start the async runtime: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
