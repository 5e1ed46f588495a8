//! `qslice-faultfs BACKING MOUNTPOINT CONTROL`: mounts a fault-injecting pass-through of
//! BACKING on MOUNTPOINT, switched through the unix socket CONTROL, until SIGINT, SIGTERM
//! or SIGHUP (or, with `--exit-with-stdin`, the end of standard input).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use qslice_testbeds::faultfs::{serve, ServeArgs};

/// Command line of `qslice-faultfs`.
#[derive(Debug, Parser)]
#[command(about = "A FUSE pass-through file system that injects spool faults on request")]
struct Args {
    /// The directory every operation passes through to.
    backing: PathBuf,
    /// Where to mount (an existing directory).
    mountpoint: PathBuf,
    /// The control socket to create (one JSON request a line: "Ping", "Clear", "Counters", {"Set": FAULT}).
    control: PathBuf,
    /// Unmount and exit when standard input reaches end of file (the owner's lifeline).
    #[arg(long)]
    exit_with_stdin: bool,
    /// With --exit-with-stdin: remove this directory at exit if standard input closed
    /// without a `stop` (the owner died and cannot).
    #[arg(long, requires = "exit_with_stdin")]
    owner_dir: Option<PathBuf>,
    /// FUSE event loop threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let served = serve(&ServeArgs {
        backing: args.backing,
        mountpoint: args.mountpoint,
        control: args.control,
        exit_with_stdin: args.exit_with_stdin,
        owner_dir: args.owner_dir,
        threads: args.threads,
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, no backtrace: the owner shows the last lines of this log.
            eprintln!("qslice-faultfs: {e}");
            ExitCode::FAILURE
        }
    }
}
