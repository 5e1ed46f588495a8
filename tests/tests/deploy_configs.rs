//! The shipped deployment files cannot rot: every example in `deploy/config/` validates
//! with the real binaries' `--check-config`, both as shipped and with every commented-out
//! key switched on (so every key the examples document is one the binaries accept, with a
//! valid value), and the systemd units in `deploy/systemd/` run those binaries as
//! `Type=notify` services (checked by `systemd-analyze verify` where it is installed).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qslice_tests::qslice_bin;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn example(name: &str) -> PathBuf {
    workspace().join("deploy/config").join(name)
}

/// `<binary> --check-config --config <config>`, with no `QSLICE_*` variable of the test's
/// environment leaking in.
fn check_config(binary: &str, config: &Path) -> Output {
    let mut cmd = Command::new(qslice_bin(binary).expect("binary built"));
    cmd.args(["--check-config", "--config"]).arg(config);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("QSLICE_") {
            cmd.env_remove(k);
        }
    }
    cmd.output().expect("run --check-config")
}

fn assert_valid(binary: &str, config: &Path) -> String {
    let out = check_config(binary, config);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("configuration is valid"),
        "{binary} --check-config --config {} failed ({}):\n{stderr}\n{stdout}",
        config.display(),
        out.status
    );
    stdout
}

/// Every `# key = value` line and every `# [table]` line switched on; the key lines
/// counted.
fn uncomment_all(text: &str) -> (String, usize) {
    let mut keys = 0;
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            let Some(rest) = line.strip_prefix("# ") else { return line.to_owned() };
            let is_key = rest.split_once(" = ").is_some_and(|(k, _)| !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
            let is_table = rest.starts_with('[') && rest.ends_with(']') && !rest.contains(' ');
            keys += usize::from(is_key);
            if is_key || is_table {
                rest.to_owned()
            } else {
                line.to_owned()
            }
        })
        .collect();
    (lines.join("\n") + "\n", keys)
}

/// Points a `token_file` key at `token` (the coordinator reads the file when it resolves
/// its configuration).
fn with_token_file(text: &str, token: &Path) -> String {
    text.lines().map(|l| if l.starts_with("token_file = ") { format!("token_file = {:?}", token.display().to_string()) } else { l.to_owned() }).collect::<Vec<_>>().join("\n")
}

/// The runner's file keys (`FileConfig`, then `[etcd]`, `[handler]` and `[supervise.<queue>]`).
const RUNNER_KEYS: &[&str] = &[
    "node_id",
    "cluster",
    "spool",
    "lease_ttl",
    "weight",
    "queues",
    "poll_interval",
    "concurrency",
    "start_concurrency",
    "drain_timeout",
    "state_dir",
    "metrics_addr",
    "log_format",
    "[etcd]",
    "endpoints",
    "user",
    "password",
    "ca",
    "cert",
    "key",
    "[handler]",
    "kind",
    "command",
    "timeout",
    "retry_backoff",
    "move_to",
    // One [supervise.<queue>] table (`SuperviseConfig`).
    "[supervise.in]",
    "flavour",
    "python",
    "config",
    "runner",
    "spares",
    "env",
    "workdir",
    "user",
    "group",
    "stop_timeout",
    "max_restarts",
    "restart_window",
];

/// The coordinator's file keys (`FileConfig`, then `[etcd]` and `[admin]`).
const COORDINATOR_KEYS: &[&str] = &[
    "id",
    "cluster",
    "lease_ttl",
    "http_addr",
    "churn_budget",
    "max_vanished_fraction",
    "revoke_deadline",
    "safety_valve_hold",
    "in_flight_alert_after",
    "log_format",
    "[etcd]",
    "endpoints",
    "user",
    "password",
    "ca",
    "cert",
    "key",
    "[admin]",
    "addr",
    "token_file",
    "protect_reads",
    "tls_cert",
    "tls_key",
    "client_ca",
    "drain_deadline",
];

/// Every key (or table) appears in the example, set or commented out, under a comment.
fn assert_documents(path: &Path, keys: &[&str]) {
    let text = std::fs::read_to_string(path).expect("read");
    let lines: Vec<&str> = text.lines().collect();
    for key in keys {
        let at = lines.iter().position(|l| {
            let l = l.strip_prefix("# ").unwrap_or(l);
            if key.starts_with('[') {
                l == *key
            } else {
                l.starts_with(&format!("{key} = "))
            }
        });
        let at = at.unwrap_or_else(|| panic!("{} does not show key {key}", path.display()));
        let explained = lines[..at].iter().rev().take_while(|l| l.starts_with('#')).any(|l| !l.contains(" = "));
        assert!(explained || key.starts_with('['), "{}: key {key} has no comment explaining it", path.display());
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

#[test]
fn runner_examples_validate_as_shipped_and_with_every_key_switched_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["runner.toml", "runner-etcd-tls.toml"] {
        let path = example(name);
        let shipped = assert_valid("qslice-runner", &path);
        assert!(shipped.contains("spool = \"/var/lib/mailman/qfiles\""), "{name}: {shipped}");
        let (all, keys) = uncomment_all(&std::fs::read_to_string(&path).expect("read"));
        let printed = assert_valid("qslice-runner", &write(dir.path(), name, &all));
        if name == "runner.toml" {
            assert_documents(&path, RUNNER_KEYS);
            assert!(keys >= 10, "runner.toml shows only {keys} optional keys");
            assert!(printed.contains("queues = [\"in\", \"out\", \"bounces\"]"), "the commented keys took no effect: {printed}");
            assert!(printed.contains("[supervise.in]") && printed.contains("flavour = \"mailman2\""), "no supervised queue: {printed}");
        }
    }
    let tls = assert_valid("qslice-runner", &example("runner-etcd-tls.toml"));
    assert!(tls.contains("https://etcd1.example.org:2379") && tls.contains("etcd-client-key.pem"), "{tls}");
    assert!(!tls.contains("change-me"), "--check-config must not print the etcd password");
}

#[test]
fn coordinator_examples_validate_as_shipped_and_with_every_key_switched_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = write(dir.path(), "admin-token", "s3cret\n");
    for name in ["coordinator.toml", "coordinator-etcd-tls.toml"] {
        let text = with_token_file(&std::fs::read_to_string(example(name)).expect("read"), &token);
        assert_valid("qslice-coordinator", &write(dir.path(), name, &text));
        let (all, keys) = uncomment_all(&text);
        let printed = assert_valid("qslice-coordinator", &write(dir.path(), &format!("all-{name}"), &with_token_file(&all, &token)));
        if name == "coordinator.toml" {
            assert_documents(&example(name), COORDINATOR_KEYS);
            assert!(keys >= 10, "coordinator.toml shows only {keys} optional keys");
            assert!(printed.contains("client_ca = \"/etc/qslice/tls/admin-clients-ca.pem\""), "the commented keys took no effect: {printed}");
        }
        assert!(!printed.contains("s3cret"), "--check-config must not print the admin token");
    }
    // As shipped, the plain example needs no file to exist.
    assert_valid("qslice-coordinator", &example("coordinator.toml"));
}

#[test]
fn check_config_refuses_a_misspelt_key_of_an_example() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(example("runner.toml")).expect("read").replace("# lease_ttl = ", "lease_tll = ");
    let out = check_config("qslice-runner", &write(dir.path(), "typo.toml", &text));
    assert_eq!(out.status.code(), Some(2), "a typo must be refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("lease_tll"), "the error names the key");
}

/// The `Key=value` settings of a unit file, in order.
fn settings(unit: &str) -> Vec<(String, String)> {
    unit.lines().filter(|l| !l.starts_with('#') && !l.starts_with('[')).filter_map(|l| l.split_once('=').map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))).collect()
}

#[test]
fn systemd_units_run_the_daemons_as_notify_services_with_watchdog_and_hardening() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (unit, binary) in [("qslice-runner.service", "qslice-runner"), ("qslice-coordinator.service", "qslice-coordinator")] {
        let text = std::fs::read_to_string(workspace().join("deploy/systemd").join(unit)).expect("read unit");
        let s = settings(&text);
        let get = |k: &str| s.iter().filter(|(key, _)| key == k).map(|(_, v)| v.as_str()).collect::<Vec<_>>();
        let config = if binary == "qslice-runner" { "runner.toml" } else { "coordinator.toml" };
        assert_eq!(get("ExecStart"), vec![format!("/usr/local/bin/{binary} --config /etc/qslice/{config}")], "{unit}");
        for (key, value) in [("Type", "notify"), ("Restart", "on-failure"), ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("PrivateTmp", "yes")] {
            assert_eq!(get(key), vec![value], "{unit}: {key}");
        }
        assert_eq!(get("WatchdogSec").len(), 1, "{unit}: the daemons ping the watchdog");
        if binary == "qslice-runner" {
            let rw = get("ReadWritePaths").join(" ");
            assert!(rw.contains("/var/lib/mailman"), "{unit}: the spool must be writable: {rw}");
            assert_eq!(get("StateDirectory"), vec!["qslice"], "{unit}: state_dir defaults to /var/lib/qslice/<node_id>");
            assert_eq!(get("KillMode"), vec!["mixed"], "{unit}: the runner stops its own children");
        }
        // systemd's own check, with ExecStart pointed at the built binary.
        if Path::new("/usr/bin/systemd-analyze").exists() {
            let built = qslice_bin(binary).expect("binary");
            let copy = write(dir.path(), unit, &text.replace(&format!("/usr/local/bin/{binary}"), &built.display().to_string()));
            let out = Command::new("/usr/bin/systemd-analyze").arg("verify").arg(&copy).output().expect("systemd-analyze");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify {unit}: {stderr}");
        } else {
            eprintln!("systemd-analyze not installed: {unit} checked by its settings only");
        }
    }
}

#[test]
fn the_mailman3_site_example_serves_every_queue_and_runs_task_digests_and_notify_once() {
    // The example names the site's venv and mailman.cfg; here they are stand-ins that exist.
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write(dir.path(), "mailman.cfg", "[mailman]\n");
    let python = Command::new("sh").args(["-c", "command -v python3"]).output().expect("which python3");
    let python = String::from_utf8_lossy(&python.stdout).trim().to_owned();
    let text = std::fs::read_to_string(example("mailman3-site-runner.toml")).expect("read");
    let local = text.replace("/opt/mailman/venv/bin/python", &python).replace("/etc/mailman3/mailman.cfg", &cfg.display().to_string());
    let printed = assert_valid("qslice-runner", &write(dir.path(), "site.toml", &local));
    for queue in ["in", "pipeline", "out", "retry", "bounces", "digest", "archive", "virgin", "command", "nntp"] {
        assert!(printed.contains(&format!("[supervise.{queue}]")), "{queue} is served: {printed}");
    }
    assert!(
        printed.contains("[singleton.task]") && printed.contains("\"-r\", \"task\"]") && printed.contains("long_running = true"),
        "task is a long-running singleton: {printed}"
    );
    for periodic in ["digests", "notify"] {
        assert!(printed.contains(&format!("[singleton.{periodic}]")), "{periodic} is a periodic singleton: {printed}");
    }
    // lmtp and rest run on every host outside qslice, under systemd.
    for runner in ["lmtp", "rest"] {
        let unit = std::fs::read_to_string(workspace().join("deploy/systemd").join(format!("mailman3-{runner}.service"))).expect("unit");
        let s = settings(&unit);
        let exec: Vec<&str> = s.iter().filter(|(k, _)| k == "ExecStart").map(|(_, v)| v.as_str()).collect();
        assert_eq!(exec, vec![format!("/opt/mailman/venv/bin/runner -C /etc/mailman3/mailman.cfg -r {runner}")], "mailman3-{runner}.service");
        if Path::new("/usr/bin/systemd-analyze").exists() {
            // systemd's own check, with ExecStart pointed at a program that exists.
            let copy = write(dir.path(), &format!("mailman3-{runner}.service"), &unit.replace("/opt/mailman/venv/bin/runner", "/bin/true"));
            let out = Command::new("/usr/bin/systemd-analyze").arg("verify").arg(&copy).output().expect("systemd-analyze");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify mailman3-{runner}.service: {stderr}");
        }
    }
}
