//! Rows as text: aligned tables, reply lines, and one line per drain message or event
//! (or a JSON line each with `--json`). Pure.

use qslice_proto::admin::{DrainProgress, Event};

use super::rows::{drain_row, event_row, MoveRow, PinRow, RebalanceView};
use crate::offline::format_age;
use crate::status_rows::{CoordinatorRow, NodeRow, QueueRow, SingletonRow, SliceRow, StatusView};

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

/// What every column of `qslicectl status` (and of `nodes` and `queues`) means: the
/// status subcommand's `--help` prints it, and docs/OPERATIONS.md says the same.
pub const STATUS_COLUMNS_HELP: &str = "\
The summary names the cluster, the leading coordinator and the standbys (with their admin
API addresses), whether maintenance mode is on (only orphaned slices move), and each
active alert. Then three tables, and a fourth when the cluster runs singleton commands;
`-` means none. --json prints the same rows (and a few
more fields); the names in brackets are its field names, which stay stable.

Runners (also `qslicectl nodes`):
  NODE              node id [id]
  HOST              host the runner runs on [host]
  STATE             ready, or cordoned: takes no new slices [cordoned]
  WEIGHT            relative share of slices it should get [weight]
  SLICES HELD       slices it holds claims on now [slices_held]
  QUEUES            queues it may serve: all, or a list [queues, empty for all]
  UP                time since this incarnation registered [age_seconds]
  VERSION           qslice version of the runner [version]

Queues (also `qslicectl queues`):
  QUEUE             queue name [name]
  SLICES            slice count [slices]
  FLAVOUR           whose slicing the queue follows: Mailman 2.1 (any slice count) or
                    Mailman 3 (a power of two, as in mailman.cfg) [mailman3]
  STATE             active, paused, reslicing (old claims left), or no eligible node
                    (refused by / cordoned: who) [state, paused, no_eligible_node, refused_by]

Slices (with --slices):
  QUEUE             queue name [queue]
  SLICE             slice number [slice]
  ASSIGNED TO       node the leader assigned it to, `(pinned)` if pinned [desired_owner, pinned]
  CLAIMED BY        node that holds its claim now; differs from ASSIGNED TO during a move
                    [claim_holder]
  EPOCH             the claim's epoch (etcd create revision), fences older owners [epoch]
  WAITING           entries waiting in the slice [depth]
  OLDEST WAITING    age of the oldest waiting entry [oldest_entry_age_seconds]
  OLDEST IN FLIGHT  age of the oldest entry being handled (a .bak file), `(too long)` past
                    the coordinator's in_flight_alert_after [in_flight,
                    oldest_in_flight_age_seconds, in_flight_too_long]
  UNOWNED FOR       time with no claim holder, `(no eligible node)` if no node may take it,
                    `(held: N's lease revoked)` while it is held back after a revoke
                    [unowned_seconds, no_eligible_node, held_after_revoke_of]

Singletons (commands of the runners' [singleton.<name>] tables, run on one node at a time):
  SINGLETON         its name [name]
  HELD BY           node that holds its claim and runs it; `-` when none does [holder,
                    incarnation]
  SINCE             time since that node claimed it [held_seconds]
  EPOCH             the claim's epoch (etcd create revision), grows with every holder [epoch]
  LAST SLOT         a periodic one's last settled slot (UTC) and how it ended: ok, failed,
                    timeout, skipped, or baseline (where its schedule started)
                    [last_slot_unix_seconds, last_outcome]
";

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
                if n.queues.is_empty() { "all".to_owned() } else { n.queues.join(",") },
                format_age(n.age_seconds as f64),
                n.version.clone(),
            ]
        })
        .collect();
    render_table(&["NODE", "HOST", "STATE", "WEIGHT", "SLICES HELD", "QUEUES", "UP", "VERSION"], &rows)
}

/// The queues table. FLAVOUR says which Mailman's slicing rules the queue follows:
/// `Mailman 2.1` (any slice count) or `Mailman 3` (a power of two, read from mailman.cfg).
pub fn render_queues(queues: &[QueueRow]) -> String {
    let rows: Vec<Vec<String>> =
        queues.iter().map(|q| vec![q.name.clone(), q.slices.to_string(), if q.mailman3 { "Mailman 3" } else { "Mailman 2.1" }.to_owned(), q.state.clone()]).collect();
    render_table(&["QUEUE", "SLICES", "FLAVOUR", "STATE"], &rows)
}

/// The per-slice table of `status --slices`. OLDEST IN FLIGHT is the age of the slice's
/// oldest in-flight entry, marked `(too long)` past the coordinator's `in_flight_alert_after`.
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
                (false, _) if s.held_after_revoke_of.is_some() => {
                    format!("{} (held: {}'s lease revoked)", format_age(s.unowned_seconds), s.held_after_revoke_of.as_deref().unwrap_or_default())
                }
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
    render_table(&["QUEUE", "SLICE", "ASSIGNED TO", "CLAIMED BY", "EPOCH", "WAITING", "OLDEST WAITING", "OLDEST IN FLIGHT", "UNOWNED FOR"], &rows)
}

/// The singletons table of `status`.
pub fn render_singletons(singletons: &[SingletonRow]) -> String {
    let rows: Vec<Vec<String>> = singletons
        .iter()
        .map(|s| {
            let held = s.holder.is_some();
            let last = match (s.last_slot_unix_seconds, &s.last_outcome) {
                (Some(at), outcome) => {
                    let when = u64::try_from(at)
                        .map(|t| humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t)).to_string())
                        .unwrap_or_else(|_| at.to_string());
                    format!("{when} {}", outcome.as_deref().unwrap_or("?"))
                }
                (None, _) => "-".to_owned(),
            };
            vec![
                s.name.clone(),
                dash(&s.holder),
                if held { format_age(s.held_seconds as f64) } else { "-".to_owned() },
                if held { s.epoch.to_string() } else { "-".to_owned() },
                last,
            ]
        })
        .collect();
    render_table(&["SINGLETON", "HELD BY", "SINCE", "EPOCH", "LAST SLOT"], &rows)
}

/// The status as text: a summary, then the nodes, queues and (if asked) slices tables,
/// and the singletons when there are any.
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
    out.push_str(&format!("standbys:    {}\n", if standbys.is_empty() { "none".to_owned() } else { standbys.join(", ") }));
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
    if !s.singletons.is_empty() {
        out.push('\n');
        out.push_str(&render_singletons(&s.singletons));
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
    let rows: Vec<Vec<String>> =
        r.moves.iter().map(|m| vec![m.queue.clone(), m.slice.to_string(), dash(&m.from_node), dash(&m.to_node), m.reason.clone().unwrap_or_default()]).collect();
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
    use qslice_proto::admin::*;

    use super::*;
    use crate::ctl::rows::{event_row, rebalance_view};
    use crate::status_rows::fixtures::status_reply;
    use crate::status_rows::status_view;

    #[test]
    fn status_renders_a_summary_and_aligned_tables() {
        let text = render_status(&status_view(&status_reply(), true));
        let expected = "\
cluster:     prod
leader:      coord-a (http://a:7700)
standbys:    coord-b (http://b:7700)
maintenance: on
alert:       slice in/1 unowned for 12s

NODE      HOST              STATE     WEIGHT  SLICES HELD  QUEUES  UP     VERSION
n1        n1.example        ready     1       4            all     3m05s  0.1.0
node-two  node-two.example  cordoned  1       4            in,out  3m05s  0.1.0

QUEUE    SLICES  FLAVOUR      STATE
in       4       Mailman 2.1  active
out      8       Mailman 3    paused
bounces  1       Mailman 2.1  no eligible node (refused by n1; cordoned: node-two)

QUEUE    SLICE  ASSIGNED TO  CLAIMED BY  EPOCH  WAITING  OLDEST WAITING  OLDEST IN FLIGHT   UNOWNED FOR
in       0      n1 (pinned)  n1          42     3        3m05s           12m05s (too long)  -
in       1      n1           -           -      0        -               4s                 12s (held: node-two's lease revoked)
bounces  0      -            -           -      0        -               -                  30s (no eligible node)

SINGLETON  HELD BY  SINCE  EPOCH  LAST SLOT
digests    n1       1h02m  57     2026-12-01T00:00:00Z ok
notify     -        -      -      -
";
        assert_eq!(text, expected);
        let without = render_status(&status_view(&status_reply(), false));
        assert!(!without.contains("ASSIGNED TO"), "no slice table unless asked for:\n{without}");
    }

    #[test]
    fn the_status_help_explains_every_column_it_prints() {
        let text = render_status(&status_view(&status_reply(), true));
        for header in text.lines().filter(|l| l.starts_with("NODE ") || l.starts_with("QUEUE ") || l.starts_with("SINGLETON ")) {
            // Headers are split on two or more blanks: a header may have a blank inside.
            for column in header.split("  ").map(str::trim).filter(|c| !c.is_empty()) {
                assert!(STATUS_COLUMNS_HELP.contains(&format!("  {column} ")), "column {column} is not in the help");
            }
        }
        for (field, _) in serde_json::to_value(status_view(&status_reply(), true)).expect("json")["slices"][0].as_object().expect("row") {
            assert!(STATUS_COLUMNS_HELP.contains(field.as_str()), "JSON field {field} is not in the help");
        }
        for (field, _) in serde_json::to_value(status_view(&status_reply(), true)).expect("json")["singletons"][0].as_object().expect("row") {
            assert!(STATUS_COLUMNS_HELP.contains(field.as_str()), "JSON field {field} is not in the help");
        }
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
        assert_eq!(render_rebalance(&rebalance_view(&RebalanceResponse::default())), "no moves: the assignment is balanced\n");
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
        let p = DrainProgress { node: "n1".into(), slices_remaining: 0, slices_moved: 5, done: true, message: String::new() };
        assert_eq!(drain_line(&p, false), "n1: 5 moved, 0 remaining, done");
        let json: serde_json::Value = serde_json::from_str(&drain_line(&p, true)).expect("one JSON line");
        assert_eq!((json["done"].clone(), json["slices_moved"].clone()), (true.into(), 5.into()));
    }

    #[test]
    fn tables_pad_by_characters_and_trim_line_ends() {
        let t = render_table(&["A", "LONG-HEADER"], &[vec!["äöü".into(), String::new()], vec!["x".into(), "y".into()]]);
        assert_eq!(t, "A    LONG-HEADER\näöü\nx    y\n");
    }
}
