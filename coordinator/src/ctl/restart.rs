//! `qslicectl rolling-restart`: restart or upgrade runner nodes one at a time without
//! stopping any queue, on the admin API's existing calls.
//!
//! For each node in turn: drain it (DrainNode: cordon, then wait until it holds and is
//! assigned nothing); run the operator's command (`--exec`, with `{node}` and
//! `$QSLICE_NODE` naming the node) or tell the operator to restart it now; wait until the
//! node is registered again as a new incarnation (ListNodes); uncordon it; and optionally
//! wait until it holds slices again. Every wait is bounded by the step timeout. A failure
//! stops the run and leaves the node cordoned, saying so, so that nothing is handed to a
//! node in an unknown state. The decisions (order, who may be drained, when a node is
//! back) are pure functions of ListNodes replies; the flow is [`rolling_restart`].

use std::time::Duration;

use qslice_proto::admin::NodeInfo;
use serde::Serialize;

use super::client::{Admin, CtlError};
use super::render::drain_line;

/// How often the node list is polled while waiting.
pub const POLL: Duration = Duration::from_millis(200);

/// What to restart and how.
#[derive(Clone, Debug)]
pub struct RestartOptions {
    /// The nodes to restart, in order; empty with `all`.
    pub nodes: Vec<String>,
    /// Every live node, in id order (cordoned ones are skipped: their cordon is the
    /// operator's, and a rolling restart would lift it).
    pub all: bool,
    /// A shell command that restarts (or upgrades) the node; `{node}` is replaced by the
    /// node id, which is also in `$QSLICE_NODE`. Without it the operator restarts the node.
    pub exec: Option<String>,
    /// Bound of each step: the drain, the command, the node's return, its slices.
    pub step_timeout: Duration,
    /// Wait until the node holds slices again before going on.
    pub wait_for_slices: bool,
    /// Accept the node back under the same incarnation (a command that does not restart
    /// the runner process).
    pub same_incarnation_ok: bool,
}

/// One step of the run, as printed (a line, or a JSON line with `--json`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RestartStep {
    /// The node.
    pub node: String,
    /// `drain`, `drained`, `exec`, `restart-now`, `back`, `uncordoned`, `slices`, `done`, `skip`.
    pub step: String,
    /// What happened, in words.
    pub message: String,
}

/// Why a rolling restart stopped.
#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    /// An admin call failed.
    #[error(transparent)]
    Admin(#[from] CtlError),
    /// Neither a node nor `--all` was given, or a node is unknown.
    #[error("{0}")]
    Select(String),
    /// Draining the node would leave its slices with nobody.
    #[error("{node}: no other live node that is not cordoned would take its slices; start or uncordon another node first")]
    NoOtherNode {
        /// The node.
        node: String,
    },
    /// A step did not finish; the node stays cordoned.
    #[error("{node}: {what}; {node} stays cordoned: once it is healthy, `qslicectl uncordon {node}` (or run the rolling restart again)")]
    Step {
        /// The node.
        node: String,
        /// What did not happen.
        what: String,
    },
}

/// Nodes skipped by `--all`, each with why.
pub type Skipped = Vec<(String, String)>;

/// The nodes to restart, in order, and the ones skipped with why.
pub fn restart_order(nodes: &[NodeInfo], chosen: &[String], all: bool) -> Result<(Vec<String>, Skipped), RestartError> {
    if all {
        let mut ids: Vec<&NodeInfo> = nodes.iter().collect();
        ids.sort_by(|a, b| a.id.cmp(&b.id));
        let (skip, go): (Vec<&NodeInfo>, Vec<&NodeInfo>) = ids.into_iter().partition(|n| n.cordoned);
        let skipped = skip.into_iter().map(|n| (n.id.clone(), "cordoned before the rolling restart: restart it alone (--node) to have it uncordoned".to_owned())).collect();
        return Ok((go.into_iter().map(|n| n.id.clone()).collect(), skipped));
    }
    if chosen.is_empty() {
        return Err(RestartError::Select("name a node with --node NODE (repeatable), or --all".to_owned()));
    }
    for id in chosen {
        if !nodes.iter().any(|n| &n.id == id) {
            let live: Vec<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
            return Err(RestartError::Select(format!("node {id:?} is not live (live nodes: {})", if live.is_empty() { "none".to_owned() } else { live.join(", ") })));
        }
    }
    Ok((chosen.to_vec(), Vec::new()))
}

/// Whether some live node other than `node` is not cordoned (and so may take its slices).
pub fn others_can_take(nodes: &[NodeInfo], node: &str) -> bool {
    nodes.iter().any(|n| n.id != node && !n.cordoned && n.weight > 0)
}

/// `node` as registered again: a new incarnation (or any, with `same_ok`), if it is back.
pub fn back_again<'a>(nodes: &'a [NodeInfo], node: &str, before: &str, same_ok: bool) -> Option<&'a NodeInfo> {
    nodes.iter().find(|n| n.id == node && (same_ok || n.incarnation != before))
}

/// The command line for `node`: `{node}` replaced by its id.
pub fn command_for(exec: &str, node: &str) -> String {
    exec.replace("{node}", node)
}

/// Restarts the chosen nodes one at a time; hands every step to `emit`.
pub async fn rolling_restart(admin: &Admin, opts: &RestartOptions, mut emit: impl FnMut(&RestartStep)) -> Result<(), RestartError> {
    let (order, skipped) = restart_order(&admin.nodes().await?, &opts.nodes, opts.all)?;
    for (node, why) in skipped {
        emit(&RestartStep { node, step: "skip".into(), message: why });
    }
    for node in &order {
        restart_one(admin, opts, node, &mut emit).await?;
    }
    Ok(())
}

async fn restart_one(admin: &Admin, opts: &RestartOptions, node: &str, emit: &mut impl FnMut(&RestartStep)) -> Result<(), RestartError> {
    let started = tokio::time::Instant::now();
    let step = |step: &str, message: String| RestartStep { node: node.to_owned(), step: step.to_owned(), message };
    macro_rules! say {
        ($step:expr, $message:expr) => {
            emit(&step($step, $message))
        };
    }
    let step_err = |what: String| RestartError::Step { node: node.to_owned(), what };
    let nodes = admin.nodes().await?;
    let before = nodes.iter().find(|n| n.id == node).cloned().ok_or_else(|| RestartError::Select(format!("node {node:?} is not live")))?;
    if !others_can_take(&nodes, node) {
        return Err(RestartError::NoOtherNode { node: node.to_owned() });
    }

    // 1. Drain: cordon, then wait until it holds and is assigned nothing.
    say!("drain", format!("draining (incarnation {}, version {}, {} slices held)", before.incarnation, before.version, before.slices_held));
    let timeout_seconds = u32::try_from(opts.step_timeout.as_secs().max(1)).unwrap_or(u32::MAX);
    let drained = admin.drain(node, timeout_seconds, |p| emit(&step("drain", drain_line(p, false)))).await;
    match drained {
        Ok(()) => say!("drained", "holds nothing".to_owned()),
        Err(CtlError::DrainUnfinished { .. }) => return Err(step_err(format!("still held slices after {}", humantime::format_duration(opts.step_timeout)))),
        Err(e) => return Err(e.into()),
    }

    // 2. The restart: the operator's command, or the operator.
    match &opts.exec {
        Some(exec) => {
            let line = command_for(exec, node);
            say!("exec", format!("running: {line}"));
            let mut child = tokio::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(&line)
                .env("QSLICE_NODE", node)
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| step_err(format!("cannot run {line:?}: {e}")))?;
            let status = match tokio::time::timeout(opts.step_timeout, child.wait()).await {
                Ok(status) => status.map_err(|e| step_err(format!("{line:?}: {e}")))?,
                Err(_) => return Err(step_err(format!("{line:?} did not finish within {}", humantime::format_duration(opts.step_timeout)))),
            };
            if !status.success() {
                return Err(step_err(format!("{line:?} failed ({status})")));
            }
        }
        None => say!(
            "restart-now",
            format!("{node} holds nothing: restart or upgrade it now; waiting up to {} for it to register again", humantime::format_duration(opts.step_timeout))
        ),
    }

    // 3. Back: registered again, as a new incarnation unless told otherwise.
    let deadline = tokio::time::Instant::now() + opts.step_timeout;
    let back = loop {
        let nodes = admin.nodes().await?;
        if let Some(n) = back_again(&nodes, node, &before.incarnation, opts.same_incarnation_ok) {
            break n.clone();
        }
        if tokio::time::Instant::now() >= deadline {
            let what = if opts.same_incarnation_ok {
                "did not register again"
            } else {
                "did not register again as a new incarnation (was it restarted? --same-incarnation accepts the old one)"
            };
            return Err(step_err(format!("{what} within {}", humantime::format_duration(opts.step_timeout))));
        }
        wait_or_interrupt(node).await?;
    };
    say!("back", format!("registered as incarnation {} (was {}), version {}", back.incarnation, before.incarnation, back.version));

    // 4. Uncordon, and optionally wait until it holds slices again.
    admin.cordon(node, false).await?;
    say!("uncordoned", "takes slices again".to_owned());
    if opts.wait_for_slices {
        let deadline = tokio::time::Instant::now() + opts.step_timeout;
        loop {
            let nodes = admin.nodes().await?;
            if let Some(n) = nodes.iter().find(|n| n.id == node && n.slices_held > 0) {
                say!("slices", format!("holds {} slices", n.slices_held));
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RestartError::Step {
                    node: node.to_owned(),
                    what: format!("holds no slice {} after the uncordon (it is uncordoned; see `qslicectl explain`)", humantime::format_duration(opts.step_timeout)),
                });
            }
            wait_or_interrupt(node).await?;
        }
    }
    say!("done", format!("restarted in {}", humantime::format_duration(Duration::from_millis(started.elapsed().as_millis() as u64))));
    Ok(())
}

/// Sleeps one poll interval; Ctrl-C stops the run (the node stays cordoned).
async fn wait_or_interrupt(node: &str) -> Result<(), RestartError> {
    tokio::select! {
        _ = tokio::time::sleep(POLL) => Ok(()),
        _ = tokio::signal::ctrl_c() => Err(RestartError::Step { node: node.to_owned(), what: "interrupted".to_owned() }),
    }
}

/// One step as a line (`r1: drained: holds nothing`), or as a JSON line.
pub fn step_line(s: &RestartStep, json: bool) -> String {
    if json {
        return serde_json::to_string(s).unwrap_or_default();
    }
    if s.step == "drain" {
        return format!("{}: {}", s.node, s.message.trim_start_matches(&format!("{}: ", s.node)));
    }
    format!("{}: {}: {}", s.node, s.step, s.message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, cordoned: bool, incarnation: &str) -> NodeInfo {
        NodeInfo { id: id.into(), cordoned, incarnation: incarnation.into(), weight: 1, ..NodeInfo::default() }
    }

    #[test]
    fn all_goes_in_id_order_and_skips_nodes_the_operator_cordoned() {
        let nodes = [node("r3", false, "a"), node("r1", false, "b"), node("r2", true, "c")];
        let (order, skipped) = restart_order(&nodes, &[], true).expect("all");
        assert_eq!(order, vec!["r1", "r3"]);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].0, "r2");
        let (order, _) = restart_order(&nodes, &["r2".to_owned()], false).expect("named");
        assert_eq!(order, vec!["r2"], "a node named alone is restarted even when cordoned");
        let err = restart_order(&nodes, &["ghost".to_owned()], false).expect_err("unknown").to_string();
        assert!(err.contains("\"ghost\" is not live") && err.contains("r3, r1, r2"), "{err}");
        assert!(restart_order(&nodes, &[], false).expect_err("nothing chosen").to_string().contains("--all"));
    }

    #[test]
    fn a_node_is_drained_only_when_another_may_take_its_slices() {
        let nodes = [node("r1", false, "a"), node("r2", true, "b")];
        assert!(!others_can_take(&nodes, "r1"), "r2 is cordoned");
        assert!(others_can_take(&nodes, "r2"));
        let zero = [node("r1", false, "a"), NodeInfo { weight: 0, ..node("r2", false, "b") }];
        assert!(!others_can_take(&zero, "r1"), "weight 0 takes nothing");
    }

    #[test]
    fn a_node_is_back_as_a_new_incarnation() {
        let nodes = [node("r1", true, "old")];
        assert!(back_again(&nodes, "r1", "old", false).is_none(), "not restarted yet");
        assert!(back_again(&nodes, "r1", "old", true).is_some(), "accepted with --same-incarnation");
        let nodes = [node("r1", true, "new")];
        assert_eq!(back_again(&nodes, "r1", "old", false).map(|n| n.incarnation.as_str()), Some("new"));
        assert!(back_again(&[], "r1", "old", true).is_none(), "not registered");
    }

    #[test]
    fn the_command_names_the_node() {
        assert_eq!(command_for("ssh {node} systemctl restart qslice-runner", "mail2"), "ssh mail2 systemctl restart qslice-runner");
        let step = RestartStep { node: "r1".into(), step: "back".into(), message: "registered".into() };
        assert_eq!(step_line(&step, false), "r1: back: registered");
        let json: serde_json::Value = serde_json::from_str(&step_line(&step, true)).expect("json line");
        assert_eq!(json["step"], "back");
    }
}
