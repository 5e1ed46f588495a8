//! The shipped Prometheus alerting rules (`deploy/prometheus/qslice-alerts.yml`) cannot
//! rot: `promtool check rules` accepts them, `promtool test rules` runs their unit tests
//! (`qslice-alerts.test.yml`: each alert fires on the series that mean trouble and stays
//! quiet on a healthy cluster's), every metric they name is one the binaries export, with
//! the labels the rules select or group by, and docs/OPERATIONS.md describes every alert.
//!
//! promtool comes with Debian's `prometheus` package (tests/run.sh installs it). Without
//! it these tests fail: a check that skips silently is no check.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rules_dir() -> PathBuf {
    workspace().join("deploy/prometheus")
}

fn rules_text() -> String {
    fs::read_to_string(rules_dir().join("qslice-alerts.yml")).expect("read deploy/prometheus/qslice-alerts.yml")
}

/// `promtool ARGS` run in deploy/prometheus; panics if promtool is not installed.
fn promtool(args: &[&str]) -> Output {
    let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("promtool not found: install Debian's prometheus package (tests/run.sh does)");
    Command::new(&promtool).args(args).current_dir(rules_dir()).output().expect("run promtool")
}

fn assert_success(what: &str, out: &Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stdout.contains("SUCCESS"), "{what} failed ({}):\n{stdout}\n{stderr}", out.status);
}

#[test]
fn shipped_alert_rules_pass_promtool_check() {
    let out = promtool(&["check", "rules", "qslice-alerts.yml"]);
    assert_success("promtool check rules deploy/prometheus/qslice-alerts.yml", &out);
}

#[test]
fn every_alert_fires_on_trouble_and_stays_quiet_on_a_healthy_cluster() {
    let out = promtool(&["test", "rules", "qslice-alerts.test.yml"]);
    assert_success("promtool test rules deploy/prometheus/qslice-alerts.test.yml", &out);
    // Every alert of the file is tested both ways: named with an expected alert somewhere,
    // and expected quiet somewhere.
    let tests = fs::read_to_string(rules_dir().join("qslice-alerts.test.yml")).expect("read the unit tests");
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    let mut current = None;
    for line in tests.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("alertname: ") {
            current = Some(name.to_owned());
        } else if let Some(rest) = line.strip_prefix("exp_alerts:") {
            let name = current.clone().expect("exp_alerts follows an alertname");
            if rest.trim() == "[]" {
                quiet.insert(name);
            } else {
                firing.insert(name);
            }
        }
    }
    for alert in alerts() {
        assert!(firing.contains(&alert), "qslice-alerts.test.yml never expects {alert} to fire");
        assert!(quiet.contains(&alert), "qslice-alerts.test.yml never expects {alert} to stay quiet");
    }
}

/// The alert names of the rules file, in order.
fn alerts() -> Vec<String> {
    rules_text().lines().filter_map(|l| l.trim().strip_prefix("- alert: ").map(|n| n.trim().to_owned())).collect()
}

/// Each rule's expression (the `expr:` line, or its block), by alert name.
fn expressions() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let text = rules_text();
    let lines: Vec<&str> = text.lines().collect();
    let mut alert = None;
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        if let Some(name) = trimmed.strip_prefix("- alert: ") {
            alert = Some(name.trim().to_owned());
        } else if let Some(rest) = trimmed.strip_prefix("expr:") {
            let indent = line.len() - trimmed.len();
            let mut expr = rest.trim().trim_start_matches('|').to_owned();
            // A block scalar: the lines indented deeper than `expr:`.
            for next in &lines[i + 1..] {
                let next_indent = next.len() - next.trim_start().len();
                if next.trim().is_empty() || next_indent <= indent {
                    break;
                }
                expr.push(' ');
                expr.push_str(next.trim());
            }
            out.insert(alert.clone().expect("expr belongs to an alert"), expr);
        }
    }
    out
}

/// Metric names (`qslice_...`) in an expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("qslice_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The labels an expression needs of `metric`: those its selectors match on
/// (`metric{label=...}`) and those it groups by (`by (a, b)`, for every metric in it).
fn labels_used(expr: &str, metric: &str) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("by (") {
        let list = &rest[at + 4..];
        let end = list.find(')').expect("by (...) is closed");
        labels.extend(list[..end].split(',').map(|l| l.trim().to_owned()));
        rest = &list[end..];
    }
    let mut rest = expr;
    let selector = format!("{metric}{{");
    while let Some(at) = rest.find(&selector) {
        let body = &rest[at + selector.len()..];
        let end = body.find('}').expect("selector is closed");
        for matcher in body[..end].split(',') {
            let name: String = matcher.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            labels.insert(name);
        }
        rest = &body[end..];
    }
    // Prometheus adds these to every series it scrapes.
    labels.remove("instance");
    labels.remove("job");
    labels
}

/// Where the binaries record metrics: `metrics::counter!("name", "label" => ...)` or
/// `gauge!`, the labels on the same line or in an array on the lines just above, or the
/// name returned by a helper (the lease keepalive's metrics, shared by both daemons).
fn exporting_sources() -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    for dir in ["runner/src", "coordinator/src", "proto/common/src"] {
        let mut stack = vec![workspace().join(dir)];
        while let Some(d) = stack.pop() {
            for entry in fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display())).flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = fs::read_to_string(&path).expect("read source");
                    files.push((path, text));
                }
            }
        }
    }
    files
}

#[test]
fn alert_rules_name_only_metrics_and_labels_the_binaries_export() {
    let sources = exporting_sources();
    let exprs = expressions();
    assert_eq!(exprs.len(), alerts().len(), "every alert has an expr: {exprs:?}");
    for (alert, expr) in &exprs {
        let metrics = metric_names(expr);
        assert!(!metrics.is_empty(), "{alert}: no qslice metric in {expr}");
        for metric in metrics {
            let quoted = format!("\"{metric}\"");
            // The source lines naming the metric, each with the two lines above it (where a
            // label array is built).
            let mut windows = Vec::new();
            for (_, text) in &sources {
                let lines: Vec<&str> = text.lines().collect();
                for (i, line) in lines.iter().enumerate() {
                    if line.contains(&quoted) {
                        windows.push(lines[i.saturating_sub(2)..=i].join("\n"));
                    }
                }
            }
            assert!(!windows.is_empty(), "{alert} uses {metric}, which no runner, coordinator or common source exports");
            for label in labels_used(expr, &metric) {
                assert!(
                    windows.iter().any(|w| w.contains(&format!("(\"{label}\"")) || w.contains(&format!("\"{label}\" =>"))),
                    "{alert} uses label {label} of {metric}, which the source does not set:\n{}",
                    windows.join("\n--\n")
                );
            }
        }
    }
}

#[test]
fn operations_guide_describes_every_shipped_alert() {
    let guide = fs::read_to_string(workspace().join("docs/OPERATIONS.md")).expect("read docs/OPERATIONS.md");
    assert!(guide.contains("deploy/prometheus/qslice-alerts.yml"), "OPERATIONS.md points to the shipped rules");
    let shipped: BTreeSet<String> = alerts().into_iter().collect();
    for alert in &shipped {
        assert!(guide.contains(&format!("**{alert}**")), "OPERATIONS.md does not describe {alert}");
    }
    // And names no alert the file does not ship.
    let mut rest = guide.as_str();
    while let Some(at) = rest.find("**Qslice") {
        let name = &rest[at + 2..];
        let end = name.find("**").expect("bold is closed");
        assert!(shipped.contains(&name[..end]), "OPERATIONS.md describes {}, which qslice-alerts.yml does not ship", &name[..end]);
        rest = &name[end + 2..];
    }
}
