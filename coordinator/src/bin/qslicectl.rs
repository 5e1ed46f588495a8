//! qslicectl: the operator's command-line client of qslice.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use qslice_coordinator::ctl::client::{self, Admin, ClientOptions, QueueChange, TlsFiles};
use qslice_coordinator::ctl::{explain, render, restart, rows};
use qslice_coordinator::offline;
use qslice_coordinator::status_rows;
use serde::Serialize;

/// Operate a qslice cluster, or inspect a Mailman spool offline.
#[derive(Parser)]
#[command(name = "qslicectl", version)]
struct Cli {
    /// Print JSON instead of tables (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    conn: ConnArgs,
    #[command(subcommand)]
    command: Command,
}

/// How to reach the coordinators' admin API (unused by the offline subcommands).
#[derive(Args)]
struct ConnArgs {
    /// Admin API addresses, comma-separated, tried in order; host:port means http://.
    #[arg(long, global = true, env = "QSLICE_COORDINATOR", default_value = client::DEFAULT_COORDINATOR, value_name = "ADDR[,ADDR...]")]
    coordinator: String,
    /// Bearer token sent with every call.
    #[arg(long, global = true, env = "QSLICE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM CA that signs the coordinators' certificates (needed for https addresses).
    #[arg(long, global = true, env = "QSLICE_ADMIN_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS.
    #[arg(long, global = true, requires = "key", value_name = "FILE")]
    cert: Option<PathBuf>,
    /// PEM client key for mutual TLS.
    #[arg(long, global = true, requires = "cert", value_name = "FILE")]
    key: Option<PathBuf>,
    /// Bound on connecting and on each call (drain and events streams are not bounded).
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
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
    /// Leader and standbys, nodes and queues (and each slice's ownership with --slices).
    #[command(after_help = render::STATUS_COLUMNS_HELP)]
    Status {
        /// Add a row per slice: owners, epoch, depth, ages.
        #[arg(long)]
        slices: bool,
    },
    /// List runner nodes.
    Nodes,
    /// List queues.
    Queues,
    /// Create, reslice, delete, pause or resume a queue.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Stop assigning new slices to a node.
    Cordon {
        /// Node id.
        node: String,
    },
    /// Let a cordoned node take slices again.
    Uncordon {
        /// Node id.
        node: String,
    },
    /// Cordon a node and move every slice away; prints progress until done.
    Drain {
        /// Node id.
        node: String,
        /// How long the coordinator waits for the slices to move (0: its default).
        #[arg(long, default_value_t = 0)]
        timeout_seconds: u32,
    },
    /// Hand one slice over to another node.
    Move {
        /// Queue name.
        queue: String,
        /// Slice number.
        slice: u32,
        /// Target node id.
        node: String,
    },
    /// Pin a slice to a node (the planner keeps it there).
    Pin {
        /// Queue name.
        queue: String,
        /// Slice number.
        slice: u32,
        /// Node id.
        node: String,
    },
    /// Remove a slice's pin.
    Unpin {
        /// Queue name.
        queue: String,
        /// Slice number.
        slice: u32,
    },
    /// Rebalance slices across nodes; prints the moves.
    Rebalance {
        /// Only plan: print the moves without making them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Switch maintenance mode (no automatic moves) on or off.
    Maintenance {
        /// on or off.
        mode: OnOff,
    },
    /// Why is this slice idle? Its desired owner and holder (epoch, lease), refusals,
    /// cordons, pins, pause, reslice and maintenance, its entries (waiting, oldest,
    /// in flight), its last move and what the leader would do next.
    Explain {
        /// The slice as QUEUE/SLICE, e.g. in/3 (slices count from 0).
        slice: String,
    },
    /// Restart or upgrade runner nodes one at a time: drain (cordon and wait until it
    /// holds nothing), run --exec or let the operator restart it, wait until it registers
    /// again as a new incarnation, uncordon. A failed step leaves the node cordoned.
    RollingRestart {
        /// A node to restart (repeatable; done in the order given).
        #[arg(long = "node", value_name = "NODE", required_unless_present = "all", conflicts_with = "all")]
        nodes: Vec<String>,
        /// Every live node in id order (nodes cordoned beforehand are skipped).
        #[arg(long)]
        all: bool,
        /// Shell command that restarts the node, run once it holds nothing; {node} and
        /// $QSLICE_NODE name the node, e.g. 'ssh {node} systemctl restart qslice-runner'.
        /// Without it, qslicectl waits for the operator to restart the node.
        #[arg(long, value_name = "CMD")]
        exec: Option<String>,
        /// Bound of each step (drain, command, return, slices).
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        step_timeout: Duration,
        /// After the uncordon, wait until the node holds slices again.
        #[arg(long)]
        wait_for_slices: bool,
        /// Accept the node back under its old incarnation (the command does not restart
        /// the runner process).
        #[arg(long)]
        same_incarnation: bool,
    },
    /// Print cluster events (for about a second, or until interrupted with --follow).
    Events {
        /// Keep printing until interrupted.
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Create a queue, or change a live queue's slice count.
    Set {
        /// Queue name.
        name: String,
        /// Number of slices.
        #[arg(long)]
        slices: u32,
        /// A Mailman 3 queue (slice count a power of two).
        #[arg(long)]
        mailman3: bool,
    },
    /// Delete a queue.
    Delete {
        /// Queue name.
        name: String,
    },
    /// Stop processing a queue.
    Pause {
        /// Queue name.
        name: String,
    },
    /// Resume processing a queue.
    Resume {
        /// Queue name.
        name: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum OnOff {
    On,
    Off,
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
        command => {
            let options = ClientOptions {
                addresses: client::parse_addresses(&cli.conn.coordinator)?,
                token: cli.conn.token.clone(),
                tls: TlsFiles { ca: cli.conn.ca.clone(), cert: cli.conn.cert.clone(), key: cli.conn.key.clone() },
                timeout: cli.conn.timeout,
            };
            let admin = Admin::new(&options)?;
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(online(&admin, command, cli.json))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prints `value` as JSON, or the table `render` makes.
fn emit<T: Serialize>(json: bool, value: &T, render: impl FnOnce(&T) -> String) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", render(value));
    }
    Ok(())
}

/// Runs one admin API subcommand.
async fn online(admin: &Admin, command: &Command, json: bool) -> anyhow::Result<()> {
    match command {
        Command::SliceOf { .. } | Command::Spool { .. } => unreachable!("offline subcommands are run by run()"),
        Command::Status { slices } => {
            let view = status_rows::status_view(&admin.status(*slices).await?, *slices);
            emit(json, &view, render::render_status)
        }
        Command::Nodes => emit(json, &status_rows::node_rows(&admin.nodes().await?), |r| render::render_nodes(r)),
        Command::Queues => emit(json, &status_rows::queue_rows(&admin.queues().await?), |r| render::render_queues(r)),
        Command::Queue { command } => {
            let (verb, name, queue) = match command {
                QueueCommand::Set { name, slices, mailman3 } => ("set", name, admin.put_queue(name, *slices, *mailman3).await?),
                QueueCommand::Delete { name } => queue_change(admin, QueueChange::Delete, name).await?,
                QueueCommand::Pause { name } => queue_change(admin, QueueChange::Pause, name).await?,
                QueueCommand::Resume { name } => queue_change(admin, QueueChange::Resume, name).await?,
            };
            let row = queue.as_ref().map(status_rows::queue_row);
            emit(json, &row, |r| render::render_queue_reply(verb, name, r.as_ref()))
        }
        Command::Cordon { node } | Command::Uncordon { node } => {
            let cordon = matches!(command, Command::Cordon { .. });
            let row = admin.cordon(node, cordon).await?.as_ref().map(status_rows::node_row);
            let verb = if cordon { "cordoned" } else { "uncordoned" };
            emit(json, &row, |r| render::render_node_reply(verb, node, r.as_ref()))
        }
        Command::Drain { node, timeout_seconds } => Ok(admin.drain(node, *timeout_seconds, |p| println!("{}", render::drain_line(p, json))).await?),
        Command::Move { queue, slice, node } => emit(json, &admin.move_slice(queue, *slice, node).await?, render::render_move),
        Command::Pin { queue, slice, node } => emit(json, &admin.pin(queue, *slice, Some(node)).await?, render::render_pin),
        Command::Unpin { queue, slice } => emit(json, &admin.pin(queue, *slice, None).await?, render::render_pin),
        Command::Rebalance { dry_run } => emit(json, &rows::rebalance_view(&admin.rebalance(*dry_run).await?), render::render_rebalance),
        Command::Maintenance { mode } => {
            let on = admin.set_maintenance(matches!(mode, OnOff::On)).await?;
            emit(json, &serde_json::json!({ "maintenance": on }), |_| render::render_maintenance(on))
        }
        Command::Explain { slice } => {
            let (queue, number) = explain::parse_slice_arg(slice)?;
            let reply = admin.explain(&queue, number).await.map_err(|e| explain_error(e, &queue))?;
            emit(json, &explain::explain_view(&reply), explain::render_explain)
        }
        Command::RollingRestart { nodes, all, exec, step_timeout, wait_for_slices, same_incarnation } => {
            let opts = restart::RestartOptions {
                nodes: nodes.clone(),
                all: *all,
                exec: exec.clone(),
                step_timeout: *step_timeout,
                wait_for_slices: *wait_for_slices,
                same_incarnation_ok: *same_incarnation,
            };
            Ok(restart::rolling_restart(admin, &opts, |s| println!("{}", restart::step_line(s, json))).await?)
        }
        Command::Events { follow } => {
            let window = if *follow { None } else { Some(client::EVENTS_WINDOW) };
            Ok(admin.watch_events(window, |e| println!("{}", render::event_line(e, json))).await?)
        }
    }
}

/// An ExplainSlice failure with what to do about it.
fn explain_error(e: client::CtlError, queue: &str) -> anyhow::Error {
    match &e {
        client::CtlError::Rpc(status) if status.code() == tonic::Code::NotFound => {
            let hint = if status.message().starts_with("queue") {
                "`qslicectl queues` lists the queues".to_owned()
            } else {
                format!("slices of {queue} count from 0; `qslicectl queues` shows its slice count")
            };
            anyhow::anyhow!("{e} ({hint})")
        }
        _ => e.into(),
    }
}

/// Deletes, pauses or resumes a queue; the reply's verb, name and queue.
async fn queue_change<'a>(admin: &Admin, change: QueueChange, name: &'a String) -> anyhow::Result<(&'static str, &'a String, Option<qslice_proto::admin::QueueInfo>)> {
    Ok((change.done_verb(), name, admin.change_queue(change, name).await?))
}
