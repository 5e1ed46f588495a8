//! The runner's configuration: a TOML file (`--config`), every key also a flag and a
//! `QSLICE_*` environment variable. Precedence: flag or environment, then file, then
//! default. Unknown file keys are errors that name the key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use qslice_proto::keys::validate_name;
use serde::Deserialize;

use qslice_common::config::{humantime_serde_opt, humantime_serialize, invalid, load_toml, ConfigError, EtcdArgs, EtcdConfig, FileEtcd, LogFormat, ETCD_MIN_TTL};

use crate::schedule::SingletonConfig;
use crate::supervise::SuperviseConfig;

/// The default of `metrics_slice_series`: per-slice series per queue and runner process.
pub const DEFAULT_SLICE_SERIES: usize = 256;

/// Command-line flags and environment variables.
#[derive(Debug, Default, Parser)]
#[command(name = "qslice-runner", version, about = "Process the slices of a shared Mailman spool that this host holds claims on")]
pub struct Args {
    /// TOML configuration file; every key may also be given as a flag or QSLICE_* variable.
    #[arg(long, env = "QSLICE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Validate the configuration, print it, and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Run as the leash of a runner (started by qslice-runner itself; see the leash module).
    #[arg(long, hide = true)]
    pub leash: bool,
    /// Unique id of this runner in the cluster [default: the host name].
    #[arg(long, env = "QSLICE_NODE_ID")]
    pub node_id: Option<String>,
    /// How to reach etcd.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Cluster name: all keys live under /qslice/<cluster>/ [default: default].
    #[arg(long, env = "QSLICE_CLUSTER")]
    pub cluster: Option<String>,
    /// The spool root holding the queue directories (qfiles/ or var/queue/).
    #[arg(long, env = "QSLICE_SPOOL")]
    pub spool: Option<PathBuf>,
    /// Lease time to live, e.g. 5s [default: 5s].
    #[arg(long, env = "QSLICE_LEASE_TTL", value_parser = humantime::parse_duration)]
    pub lease_ttl: Option<Duration>,
    /// Relative share of slices for this node [default: 1].
    #[arg(long, env = "QSLICE_WEIGHT")]
    pub weight: Option<u32>,
    /// Queues this node may serve, comma-separated [default: all].
    #[arg(long, env = "QSLICE_QUEUES", value_delimiter = ',')]
    pub queues: Option<Vec<String>>,
    /// How often each queue directory is listed [default: 200ms]; an idle queue is also
    /// listed at once when inotify sees an entry arrive from this host.
    #[arg(long, env = "QSLICE_POLL_INTERVAL", value_parser = humantime::parse_duration)]
    pub poll_interval: Option<Duration>,
    /// Entries processed at once by this node [default: 4].
    #[arg(long, env = "QSLICE_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Mailman 3 slice runners initialising Mailman at once on this node, over all its
    /// queues [default: the number of CPUs]. Each start is CPU-bound (0.7 s alone on one
    /// core); a dozen at once on two cores took 27-60 s each and starved the host.
    #[arg(long, env = "QSLICE_START_CONCURRENCY")]
    pub start_concurrency: Option<usize>,
    /// How long a released slice's in-flight work may take before it is killed [default: 30s].
    #[arg(long, env = "QSLICE_DRAIN_TIMEOUT", value_parser = humantime::parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// Directory for the runner's lock and lease files [default: /var/lib/qslice/<node_id>].
    #[arg(long, env = "QSLICE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Address for /metrics, /healthz and /readyz, e.g. 127.0.0.1:9464 [default: none].
    #[arg(long, env = "QSLICE_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Slices per queue with per-slice metrics series, beyond which only queue-level
    /// figures are exported; 0 for none [default: 256].
    #[arg(long, env = "QSLICE_METRICS_SLICE_SERIES")]
    pub metrics_slice_series: Option<usize>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "QSLICE_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Handler kind: exec, worker or move [default: exec].
    #[arg(long, env = "QSLICE_HANDLER")]
    pub handler: Option<HandlerKind>,
    /// Handler command as a JSON array, e.g. '["/usr/bin/deliver","{path}"]' (exec, worker).
    #[arg(long, env = "QSLICE_HANDLER_COMMAND", value_parser = parse_argv)]
    pub handler_command: Option<Argv>,
    /// Time one entry may take before it is preserved in bad/ [default: 300s].
    #[arg(long, env = "QSLICE_HANDLER_TIMEOUT", value_parser = humantime::parse_duration)]
    pub handler_timeout: Option<Duration>,
    /// Wait before an entry whose handler asked for a retry (exit 75) is queued again [default: 5s].
    #[arg(long, env = "QSLICE_RETRY_BACKOFF", value_parser = humantime::parse_duration)]
    pub retry_backoff: Option<Duration>,
    /// Target queue directory of the move handler.
    #[arg(long, env = "QSLICE_MOVE_TO")]
    pub move_to: Option<PathBuf>,
}

/// A command line given as one JSON array of strings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Argv(pub Vec<String>);

fn parse_argv(text: &str) -> Result<Argv, String> {
    serde_json::from_str(text).map(Argv).map_err(|e| format!("expected a JSON array of strings: {e}"))
}

/// How claimed entries are processed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HandlerKind {
    /// Run a command per entry.
    #[default]
    Exec,
    /// One long-lived coprocess per slice, one entry path per line.
    Worker,
    /// Move the entry into another queue directory.
    Move,
}

/// The configuration file; every key is optional and unknown keys are refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_id: Option<String>,
    cluster: Option<String>,
    spool: Option<PathBuf>,
    #[serde(default, with = "humantime_serde_opt")]
    lease_ttl: Option<Duration>,
    weight: Option<u32>,
    queues: Option<Vec<String>>,
    #[serde(default, with = "humantime_serde_opt")]
    poll_interval: Option<Duration>,
    concurrency: Option<usize>,
    start_concurrency: Option<usize>,
    #[serde(default, with = "humantime_serde_opt")]
    drain_timeout: Option<Duration>,
    state_dir: Option<PathBuf>,
    metrics_addr: Option<SocketAddr>,
    metrics_slice_series: Option<usize>,
    log_format: Option<LogFormat>,
    etcd: Option<FileEtcd>,
    handler: Option<FileHandler>,
    /// Queues whose slices run as supervised Mailman runners, by queue name.
    #[serde(default)]
    supervise: BTreeMap<String, SuperviseConfig>,
    /// Cluster-wide singleton commands, by name.
    #[serde(default)]
    singleton: BTreeMap<String, SingletonConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHandler {
    kind: Option<HandlerKind>,
    command: Option<Vec<String>>,
    #[serde(default, with = "humantime_serde_opt")]
    timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    retry_backoff: Option<Duration>,
    move_to: Option<PathBuf>,
}

/// The handler and its settings.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HandlerConfig {
    /// Which handler.
    pub kind: HandlerKind,
    /// Command argv with placeholders (exec, worker).
    pub command: Vec<String>,
    /// Time one entry may take.
    #[serde(with = "humantime_serialize")]
    pub timeout: Duration,
    /// Wait before a retried entry is queued again.
    #[serde(with = "humantime_serialize")]
    pub retry_backoff: Duration,
    /// Target directory (move).
    pub move_to: Option<PathBuf>,
}

/// The resolved, validated configuration.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Config {
    /// This runner's id.
    pub node_id: String,
    /// etcd connection.
    pub etcd: EtcdConfig,
    /// Cluster name (key prefix).
    pub cluster: String,
    /// Spool root.
    pub spool: PathBuf,
    /// Lease TTL.
    #[serde(with = "humantime_serialize")]
    pub lease_ttl: Duration,
    /// Weight.
    pub weight: u32,
    /// Queues this node may serve; empty means all.
    pub queues: Vec<String>,
    /// Listing interval.
    #[serde(with = "humantime_serialize")]
    pub poll_interval: Duration,
    /// Entries in flight at once.
    pub concurrency: usize,
    /// Mailman 3 slice runners initialising at once.
    pub start_concurrency: usize,
    /// Bound on finishing in-flight work of a released slice.
    #[serde(with = "humantime_serialize")]
    pub drain_timeout: Duration,
    /// Lock and lease files.
    pub state_dir: PathBuf,
    /// Metrics and health address.
    pub metrics_addr: Option<SocketAddr>,
    /// Per queue, how many slice numbers get per-slice metrics series (held slices only).
    pub metrics_slice_series: usize,
    /// Log format.
    pub log_format: LogFormat,
    /// The handler.
    pub handler: HandlerConfig,
    /// Queues run by supervised Mailman runners instead of the handler.
    pub supervise: BTreeMap<String, SuperviseConfig>,
    /// Cluster-wide singleton commands this node competes for, by name.
    pub singleton: BTreeMap<String, SingletonConfig>,
}

impl Config {
    /// Resolves flags, environment and file into a validated configuration.
    pub fn resolve(args: &Args) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => load_toml(path)?,
            None => FileConfig::default(),
        };
        let handler = file.handler.unwrap_or_default();
        let node_id = match args.node_id.clone().or(file.node_id) {
            Some(id) => id,
            None => hostname::get().ok().and_then(|h| h.into_string().ok()).ok_or_else(|| invalid("node_id", "cannot read the host name; set node_id"))?,
        };
        validate_name("node id", &node_id).map_err(|e| invalid("node_id", e.to_string()))?;
        let cluster = args.cluster.clone().or(file.cluster).unwrap_or_else(|| "default".into());
        validate_name("cluster", &cluster).map_err(|e| invalid("cluster", e.to_string()))?;
        let spool = args.spool.clone().or(file.spool).ok_or_else(|| invalid("spool", "required: the spool root that holds the queue directories"))?;
        let queues = args.queues.clone().or(file.queues).unwrap_or_default();
        for q in &queues {
            validate_name("queue", q).map_err(|e| invalid("queues", e.to_string()))?;
        }
        let lease_ttl = args.lease_ttl.or(file.lease_ttl).unwrap_or(Duration::from_secs(5));
        if lease_ttl < Duration::from_secs(1) || lease_ttl.subsec_nanos() != 0 {
            return Err(invalid("lease_ttl", "must be a whole number of seconds, at least 1s (etcd leases are in seconds)"));
        }
        let weight = args.weight.or(file.weight).unwrap_or(1);
        if weight == 0 {
            return Err(invalid("weight", "must be at least 1 (cordon a node to give it no slices)"));
        }
        let concurrency = args.concurrency.or(file.concurrency).unwrap_or(4);
        if concurrency == 0 {
            return Err(invalid("concurrency", "must be at least 1"));
        }
        let start_concurrency = args.start_concurrency.or(file.start_concurrency).unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
        if start_concurrency == 0 {
            return Err(invalid("start_concurrency", "must be at least 1"));
        }
        let poll_interval = args.poll_interval.or(file.poll_interval).unwrap_or(Duration::from_millis(200));
        if poll_interval.is_zero() {
            return Err(invalid("poll_interval", "must be above zero"));
        }
        let etcd = args.etcd.resolve(file.etcd)?;
        let handler = HandlerConfig {
            kind: args.handler.or(handler.kind).unwrap_or_default(),
            command: args.handler_command.clone().map(|a| a.0).or(handler.command).unwrap_or_default(),
            timeout: args.handler_timeout.or(handler.timeout).unwrap_or(Duration::from_secs(300)),
            retry_backoff: args.retry_backoff.or(handler.retry_backoff).unwrap_or(Duration::from_secs(5)),
            move_to: args.move_to.clone().or(handler.move_to),
        };
        let supervise = file.supervise;
        let mut queues = queues;
        for (queue, sup) in &supervise {
            validate_name("queue", queue).map_err(|e| invalid("supervise", e.to_string()))?;
            sup.check(queue, None).map_err(|e| invalid("supervise", e.to_string()))?;
        }
        match handler.kind {
            HandlerKind::Exec | HandlerKind::Worker if handler.command.is_empty() => {
                if supervise.is_empty() {
                    return Err(invalid("handler.command", "the exec and worker handlers need a command (an argv array)"));
                }
                // Without a handler this node can only run its supervised queues.
                if queues.is_empty() {
                    queues = supervise.keys().cloned().collect();
                } else if let Some(q) = queues.iter().find(|q| !supervise.contains_key(*q)) {
                    return Err(invalid("queues", format!("queue {q:?} has no [supervise.{q}] table and there is no handler.command to run it with")));
                }
            }
            HandlerKind::Move if handler.move_to.is_none() => {
                return Err(invalid("handler.move_to", "the move handler needs a target queue directory"));
            }
            _ => {}
        }
        for (name, singleton) in &file.singleton {
            singleton.check(name).map_err(|e| invalid("singleton", e))?;
        }
        let state_dir = args.state_dir.clone().or(file.state_dir).unwrap_or_else(|| Path::new("/var/lib/qslice").join(&node_id));
        Ok(Config {
            node_id,
            etcd,
            cluster,
            spool,
            lease_ttl,
            weight,
            queues,
            poll_interval,
            concurrency,
            start_concurrency,
            drain_timeout: args.drain_timeout.or(file.drain_timeout).unwrap_or(Duration::from_secs(30)),
            state_dir,
            metrics_addr: args.metrics_addr.or(file.metrics_addr),
            metrics_slice_series: args.metrics_slice_series.or(file.metrics_slice_series).unwrap_or(DEFAULT_SLICE_SERIES),
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            handler,
            supervise,
            singleton: file.singleton,
        })
    }

    /// Warnings about a valid but risky configuration.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.lease_ttl < ETCD_MIN_TTL {
            out.push(format!(
                "lease_ttl {} is below the {}s stock etcd grants; etcd will raise it unless started with a sub-second election timeout",
                humantime::format_duration(self.lease_ttl),
                ETCD_MIN_TTL.as_secs()
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["qslice-runner"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).expect("flags parse")
    }

    fn file(text: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("runner.toml");
        std::fs::write(&path, text).expect("write");
        let p = path.to_str().expect("utf8").to_owned();
        (dir, p)
    }

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let (_d, path) = file(
            "node_id = \"from-file\"\nspool = \"/spool\"\nlease_ttl = \"3s\"\n[etcd]\nendpoints = [\"http://10.0.0.1:2379\"]\n[handler]\nkind = \"move\"\nmove_to = \"/spool/out\"\n",
        );
        let cfg = Config::resolve(&args(&["--config", &path, "--node-id", "from-flag"])).expect("valid");
        assert_eq!(cfg.node_id, "from-flag");
        assert_eq!(cfg.lease_ttl, Duration::from_secs(3));
        assert_eq!(cfg.etcd.endpoints, vec!["http://10.0.0.1:2379"]);
        assert_eq!(cfg.handler.kind, HandlerKind::Move);
        assert_eq!(cfg.concurrency, 4);
        assert_eq!(cfg.state_dir, PathBuf::from("/var/lib/qslice/from-flag"));
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let (_d, path) = file("spool = \"/spool\"\nlease_tll = \"3s\"\n");
        let err = Config::resolve(&args(&["--config", &path])).expect_err("typo");
        assert!(err.to_string().contains("lease_tll"), "{err}");
        let (_d, path) = file("spool = \"/spool\"\n[handler]\nkind = \"exec\"\ncomand = []\n");
        let err = Config::resolve(&args(&["--config", &path])).expect_err("typo");
        assert!(err.to_string().contains("comand"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (vec!["--node-id", "n1"], "spool"),
            (vec!["--spool", "/s", "--node-id", "a/b"], "node_id"),
            (vec!["--spool", "/s", "--node-id", "n", "--weight", "0"], "weight"),
            (vec!["--spool", "/s", "--node-id", "n", "--lease-ttl", "1500ms"], "lease_ttl"),
            (vec!["--spool", "/s", "--node-id", "n", "--queues", "in,.."], "queues"),
            (vec!["--spool", "/s", "--node-id", "n", "--handler", "exec"], "handler.command"),
            (vec!["--spool", "/s", "--node-id", "n", "--handler", "move"], "handler.move_to"),
            (vec!["--spool", "/s", "--node-id", "n", "--handler", "move", "--move-to", "/o", "--etcd-user", "u"], "etcd.user"),
        ];
        for (flags, key) in cases {
            let err = Config::resolve(&args(&flags)).expect_err("invalid");
            assert!(err.to_string().starts_with(key), "{flags:?}: {err}");
        }
    }

    #[test]
    fn a_short_ttl_is_allowed_with_a_warning() {
        let cfg = Config::resolve(&args(&["--spool", "/s", "--node-id", "n", "--lease-ttl", "1s", "--handler-command", "[\"/bin/true\"]"])).expect("valid");
        assert_eq!(cfg.warnings().len(), 1);
        assert_eq!(cfg.handler.command, vec!["/bin/true"]);
    }

    #[test]
    fn supervised_queues_need_no_handler_and_limit_the_node_to_them() {
        let (_d, path) = file("spool = \"/s\"\nnode_id = \"n\"\n[supervise.in]\nflavour = \"mailman2\"\ncommand = [\"/usr/lib/mailman/bin/qrunner\", \"--runner=Incoming:{slice}:{slices}\", \"-s\"]\nstop_timeout = \"10s\"\n");
        let cfg = Config::resolve(&args(&["--config", &path])).expect("valid");
        assert_eq!(cfg.queues, vec!["in"], "only the supervised queue");
        assert_eq!(cfg.supervise["in"].stop_timeout, Duration::from_secs(10));
        let err = Config::resolve(&args(&["--config", &path, "--queues", "in,out"])).expect_err("out has nothing to run it");
        assert!(err.to_string().starts_with("queues") && err.to_string().contains("out"), "{err}");
        let (_d, path) = file("spool = \"/s\"\nnode_id = \"n\"\n[supervise.in]\nflavour = \"mailman2\"\ncommand = []\n");
        let err = Config::resolve(&args(&["--config", &path])).expect_err("empty command");
        assert!(err.to_string().contains("supervise.in.command"), "{err}");
        let (_d, path) = file("spool = \"/s\"\nnode_id = \"n\"\n[supervise.in]\ncommand = [\"x\"]\nstop_timout = \"1s\"\n");
        let err = Config::resolve(&args(&["--config", &path])).expect_err("typo");
        assert!(err.to_string().contains("stop_timout"), "{err}");
    }

    #[test]
    fn the_mailman3_slice_runner_needs_python_and_config_and_names_what_is_wrong() {
        let dir = tempfile::tempdir().expect("tempdir");
        let python = dir.path().join("python");
        let mailman_cfg = dir.path().join("mailman.cfg");
        std::fs::write(&python, "").expect("write");
        std::fs::write(&mailman_cfg, "").expect("write");
        let resolve = |table: &str| {
            let (_d, path) = file(&format!("spool = \"/s\"\nnode_id = \"n\"\n[supervise.in]\n{table}"));
            Config::resolve(&args(&["--config", &path])).map_err(|e| e.to_string())
        };
        let good = format!("python = {:?}\nconfig = {:?}\n", python.display().to_string(), mailman_cfg.display().to_string());
        let cfg = resolve(&good).expect("valid");
        assert_eq!(cfg.supervise["in"].flavour, crate::supervise::Flavour::Mailman3, "the default flavour");
        assert_eq!(cfg.supervise["in"].spares, 1, "one warm spare by default");
        let err = resolve(&format!("config = {:?}\n", mailman_cfg.display().to_string())).expect_err("no python");
        assert!(err.contains("supervise.in.python is required"), "{err}");
        let err = resolve(&format!("python = {:?}\nconfig = \"/nowhere/mailman.cfg\"\n", python.display().to_string())).expect_err("missing file");
        assert!(err.contains("supervise.in.config: /nowhere/mailman.cfg does not exist"), "{err}");
        let err = resolve(&format!("{good}command = [\"runner\"]\n")).expect_err("command with the slice runner");
        assert!(err.contains("mailman3-runner"), "names the flavour that takes a command: {err}");
        let sup = cfg.supervise["in"].clone();
        let err = sup.check("in", Some(6)).expect_err("6 slices").to_string();
        assert!(err.contains("6 slices") && err.contains("power of two"), "{err}");
        assert!(sup.check("in", Some(8)).is_ok());
    }
}
