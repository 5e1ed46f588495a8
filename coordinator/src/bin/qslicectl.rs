//! qslicectl: the operator's command-line client of qslice.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use qslice_coordinator::offline;

/// Operate a qslice cluster, or inspect a Mailman spool offline.
#[derive(Parser)]
#[command(name = "qslicectl", version, about)]
struct Cli {
    /// Print JSON instead of tables (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the slice of each queue file name or path (offline).
    SliceOf {
        /// Number of slices of the queue.
        #[arg(long)]
        slices: u32,
        /// Queue file names or paths, e.g. 1490350277.837968+0696655d...413c.pck
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Inspect a spool directory (offline, read-only).
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
}

#[derive(Subcommand)]
enum SpoolCommand {
    /// Per-slice counts of .pck and .bak entries and the age of each slice's oldest entry.
    Stats {
        /// The queue directory, e.g. /var/lib/mailman/qfiles/in
        dir: PathBuf,
        /// Number of slices of the queue.
        #[arg(long)]
        slices: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qslicectl: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::SliceOf { slices, names } => {
            let rows = offline::slice_of_names(names, *slices)?;
            let failed = rows.iter().any(|r| r.error.is_some());
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                for row in &rows {
                    match (&row.slice, &row.error) {
                        (Some(s), _) => println!("{s}\t{}", row.input),
                        (None, Some(e)) => eprintln!("qslicectl: {}: {e}", row.input),
                        (None, None) => unreachable!("a row has a slice or an error"),
                    }
                }
            }
            Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
        }
        Command::Spool { command: SpoolCommand::Stats { dir, slices } } => {
            let stats = offline::spool_stats(dir, *slices)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                print!("{}", offline::render_spool_stats(&stats));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
