//! The coordinator's configuration: a TOML file (`--config`), every key also a flag and a
//! `QSLICE_*` environment variable (flag or environment over file over default).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use qslice_common::config::{humantime_serde_opt, humantime_serialize, invalid, load_toml, ConfigError, EtcdArgs, EtcdConfig, FileEtcd, LogFormat};
use qslice_proto::keys::validate_name;
use serde::Deserialize;

use crate::health::{AlertSettings, DEFAULT_IN_FLIGHT_ALERT_AFTER};
use crate::planner::{DEFAULT_CHURN_BUDGET, DEFAULT_MAX_VANISHED_FRACTION};

/// The default claim deadline: a claim is one etcd round trip (milliseconds), so half a
/// second without one means the owner is gone or stuck. It is what an orphan given to a
/// node that died too waits on top of the first TTL, so it must stay well under the 1 s
/// that the failover target allows beyond the TTL (measured: 1 s gave 3.0-3.2 s at TTL 2 s
/// for two hosts frozen 1.6 s apart).
pub const DEFAULT_CLAIM_DEADLINE: Duration = Duration::from_millis(500);

/// Command-line flags and environment variables.
#[derive(Debug, Default, Parser)]
#[command(name = "qslice-coordinator", version, about = "Assign the slices of a shared Mailman spool to live qslice runners (one leader among several coordinators)")]
pub struct Args {
    /// TOML configuration file; every key may also be given as a flag or QSLICE_* variable.
    #[arg(long, env = "QSLICE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Validate the configuration, print it, and exit.
    #[arg(long)]
    pub check_config: bool,
    /// This coordinator's id in the election [default: the host name].
    #[arg(long, env = "QSLICE_COORDINATOR_ID")]
    pub id: Option<String>,
    /// How to reach etcd.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Cluster name: all keys live under /qslice/<cluster>/ [default: default].
    #[arg(long, env = "QSLICE_CLUSTER")]
    pub cluster: Option<String>,
    /// Lease time to live of the election; a standby takes over about this long after the leader dies [default: 5s].
    #[arg(long, env = "QSLICE_LEASE_TTL", value_parser = humantime::parse_duration)]
    pub lease_ttl: Option<Duration>,
    /// Address for the dashboard, /api/status, /metrics, /healthz and /readyz, e.g. 127.0.0.1:9465; it takes the admin API's token (with protect_reads) and TLS [default: none].
    #[arg(long, env = "QSLICE_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Planned moves (hand-offs) per reconcile round [default: 128].
    #[arg(long, env = "QSLICE_CHURN_BUDGET")]
    pub churn_budget: Option<usize>,
    /// Fraction of nodes that may vanish at once before balancing pauses [default: 0.5].
    #[arg(long, env = "QSLICE_MAX_VANISHED_FRACTION")]
    pub max_vanished_fraction: Option<f64>,
    /// How long an old owner may hold a moved slice before its lease is revoked; keep it above the runners' drain timeout [default: 60s].
    #[arg(long, env = "QSLICE_REVOKE_DEADLINE", value_parser = humantime::parse_duration)]
    pub revoke_deadline: Option<Duration>,
    /// How long an assigned slice may stay without any claim before it goes to another live node (claims take milliseconds; a node that does not claim is likely dying) [default: 1s].
    #[arg(long, env = "QSLICE_CLAIM_DEADLINE", value_parser = humantime::parse_duration)]
    pub claim_deadline: Option<Duration>,
    /// How long balancing stays paused after the safety valve trips [default: 2m].
    #[arg(long, env = "QSLICE_SAFETY_VALVE_HOLD", value_parser = humantime::parse_duration)]
    pub safety_valve_hold: Option<Duration>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "QSLICE_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Address of the gRPC admin API [default: 127.0.0.1:7700].
    #[arg(long, env = "QSLICE_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// File holding the admin bearer token (mutating calls need it).
    #[arg(long, env = "QSLICE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// The admin bearer token itself (prefer --admin-token-file).
    #[arg(long, env = "QSLICE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Require the token for read calls too.
    #[arg(long, env = "QSLICE_ADMIN_PROTECT_READS")]
    pub admin_protect_reads: Option<bool>,
    /// TLS certificate (PEM) of the admin API.
    #[arg(long, env = "QSLICE_ADMIN_TLS_CERT")]
    pub admin_tls_cert: Option<PathBuf>,
    /// TLS key (PEM) of the admin API.
    #[arg(long, env = "QSLICE_ADMIN_TLS_KEY")]
    pub admin_tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to (mTLS).
    #[arg(long, env = "QSLICE_ADMIN_CLIENT_CA")]
    pub admin_client_ca: Option<PathBuf>,
    /// Alert when a slice has had a message in flight (a .bak file) this long; set it above the runners' handler timeouts [default: 10m].
    #[arg(long, env = "QSLICE_IN_FLIGHT_ALERT_AFTER", value_parser = humantime::parse_duration)]
    pub in_flight_alert_after: Option<Duration>,
    /// How long DrainNode waits for a node's slices to move, unless the request says [default: 5m].
    #[arg(long, env = "QSLICE_DRAIN_DEADLINE", value_parser = humantime::parse_duration)]
    pub drain_deadline: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    id: Option<String>,
    cluster: Option<String>,
    #[serde(default, with = "humantime_serde_opt")]
    lease_ttl: Option<Duration>,
    http_addr: Option<SocketAddr>,
    churn_budget: Option<usize>,
    max_vanished_fraction: Option<f64>,
    #[serde(default, with = "humantime_serde_opt")]
    revoke_deadline: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    claim_deadline: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    safety_valve_hold: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    in_flight_alert_after: Option<Duration>,
    log_format: Option<LogFormat>,
    etcd: Option<FileEtcd>,
    admin: Option<FileAdmin>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    addr: Option<SocketAddr>,
    token_file: Option<PathBuf>,
    protect_reads: Option<bool>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    #[serde(default, with = "humantime_serde_opt")]
    drain_deadline: Option<Duration>,
}

/// The admin API's settings.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdminConfig {
    /// Listen address.
    pub addr: SocketAddr,
    /// The bearer token (never printed); `None` leaves the API open.
    #[serde(skip)]
    pub token: Option<String>,
    /// Whether reads need the token too.
    pub protect_reads: bool,
    /// TLS certificate file.
    pub tls_cert: Option<PathBuf>,
    /// TLS key file.
    pub tls_key: Option<PathBuf>,
    /// Client CA for mTLS.
    pub client_ca: Option<PathBuf>,
    /// Default DrainNode deadline.
    #[serde(with = "humantime_serialize")]
    pub drain_deadline: Duration,
}

/// The resolved, validated configuration.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Config {
    /// Election id.
    pub id: String,
    /// etcd connection.
    pub etcd: EtcdConfig,
    /// Cluster name.
    pub cluster: String,
    /// Election lease TTL.
    #[serde(with = "humantime_serialize")]
    pub lease_ttl: Duration,
    /// Metrics and health address.
    pub http_addr: Option<SocketAddr>,
    /// Planned moves per round.
    pub churn_budget: usize,
    /// Safety valve threshold.
    pub max_vanished_fraction: f64,
    /// Fence deadline for an owner that does not release a moved slice.
    #[serde(with = "humantime_serialize")]
    pub revoke_deadline: Duration,
    /// How long an assigned slice may have no claim at all before it is assigned elsewhere.
    #[serde(with = "humantime_serialize")]
    pub claim_deadline: Duration,
    /// How long the safety valve holds.
    #[serde(with = "humantime_serialize")]
    pub safety_valve_hold: Duration,
    /// A message in flight this long raises an alert.
    #[serde(with = "humantime_serialize")]
    pub in_flight_alert_after: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// The admin API.
    pub admin: AdminConfig,
}

impl Config {
    /// The thresholds of the alerts this configuration sets.
    pub fn alert_settings(&self) -> AlertSettings {
        AlertSettings { in_flight_after: self.in_flight_alert_after, ..AlertSettings::default() }
    }

    /// Resolves flags, environment and file into a validated configuration.
    pub fn resolve(args: &Args) -> Result<Config, ConfigError> {
        let file: FileConfig = match &args.config {
            Some(path) => load_toml(path)?,
            None => FileConfig::default(),
        };
        let id = match args.id.clone().or(file.id) {
            Some(id) => id,
            None => hostname::get().ok().and_then(|h| h.into_string().ok()).ok_or_else(|| invalid("id", "cannot read the host name; set id"))?,
        };
        validate_name("coordinator id", &id).map_err(|e| invalid("id", e.to_string()))?;
        let cluster = args.cluster.clone().or(file.cluster).unwrap_or_else(|| "default".into());
        validate_name("cluster", &cluster).map_err(|e| invalid("cluster", e.to_string()))?;
        let lease_ttl = args.lease_ttl.or(file.lease_ttl).unwrap_or(Duration::from_secs(5));
        if lease_ttl < Duration::from_secs(1) || lease_ttl.subsec_nanos() != 0 {
            return Err(invalid("lease_ttl", "must be a whole number of seconds, at least 1s (etcd leases are in seconds)"));
        }
        let max_vanished_fraction = args.max_vanished_fraction.or(file.max_vanished_fraction).unwrap_or(DEFAULT_MAX_VANISHED_FRACTION);
        if !(0.0..=1.0).contains(&max_vanished_fraction) {
            return Err(invalid("max_vanished_fraction", "must be between 0 and 1"));
        }
        let in_flight_alert_after = args.in_flight_alert_after.or(file.in_flight_alert_after).unwrap_or(DEFAULT_IN_FLIGHT_ALERT_AFTER);
        if in_flight_alert_after.is_zero() {
            return Err(invalid("in_flight_alert_after", "must be more than 0 (every message is in flight for a moment)"));
        }
        let claim_deadline = args.claim_deadline.or(file.claim_deadline).unwrap_or(DEFAULT_CLAIM_DEADLINE);
        if claim_deadline.is_zero() {
            return Err(invalid("claim_deadline", "must be more than 0 (a claim takes a round trip to etcd)"));
        }
        let admin = file.admin.unwrap_or_default();
        let token_file = args.admin_token_file.clone().or(admin.token_file);
        let token = match (&args.admin_token, &token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(path)) => Some(std::fs::read_to_string(path).map_err(|e| invalid("admin.token_file", format!("cannot read {}: {e}", path.display())))?.trim().to_owned()),
            (None, None) => None,
        };
        if token.as_deref() == Some("") {
            return Err(invalid("admin.token_file", "the token is empty"));
        }
        let admin = AdminConfig {
            addr: args.admin_addr.or(admin.addr).unwrap_or_else(|| "127.0.0.1:7700".parse().expect("valid address")),
            token,
            protect_reads: args.admin_protect_reads.or(admin.protect_reads).unwrap_or(false),
            tls_cert: args.admin_tls_cert.clone().or(admin.tls_cert),
            tls_key: args.admin_tls_key.clone().or(admin.tls_key),
            client_ca: args.admin_client_ca.clone().or(admin.client_ca),
            drain_deadline: args.drain_deadline.or(admin.drain_deadline).unwrap_or(Duration::from_secs(300)),
        };
        if admin.tls_cert.is_some() != admin.tls_key.is_some() {
            return Err(invalid("admin.tls_cert", "the admin TLS certificate needs its key (admin.tls_key), and the reverse"));
        }
        if admin.client_ca.is_some() && admin.tls_cert.is_none() {
            return Err(invalid("admin.client_ca", "client certificates (mTLS) need server TLS: set admin.tls_cert and admin.tls_key"));
        }
        Ok(Config {
            admin,
            id,
            etcd: args.etcd.resolve(file.etcd)?,
            cluster,
            lease_ttl,
            http_addr: args.http_addr.or(file.http_addr),
            churn_budget: args.churn_budget.or(file.churn_budget).unwrap_or(DEFAULT_CHURN_BUDGET),
            max_vanished_fraction,
            revoke_deadline: args.revoke_deadline.or(file.revoke_deadline).unwrap_or(Duration::from_secs(60)),
            claim_deadline,
            safety_valve_hold: args.safety_valve_hold.or(file.safety_valve_hold).unwrap_or(Duration::from_secs(120)),
            in_flight_alert_after,
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "id = \"c1\"\nchurn_budgett = 3\n").expect("write");
        let args = Args::try_parse_from(["qslice-coordinator", "--config", path.to_str().expect("utf8")]).expect("flags");
        let err = Config::resolve(&args).expect_err("typo");
        assert!(err.to_string().contains("churn_budgett"), "{err}");
        let args = Args::try_parse_from(["qslice-coordinator", "--id", "c1", "--max-vanished-fraction", "2"]).expect("flags");
        assert!(Config::resolve(&args).expect_err("range").to_string().starts_with("max_vanished_fraction"));
        let args = Args::try_parse_from(["qslice-coordinator", "--id", "c1", "--etcd-cert", "/c.pem"]).expect("flags");
        assert!(Config::resolve(&args).expect_err("pair").to_string().starts_with("etcd.cert"));
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "id = \"file\"\nrevoke_deadline = \"90s\"\n[etcd]\nendpoints = [\"http://e:2379\"]\n").expect("write");
        let args = Args::try_parse_from(["qslice-coordinator", "--config", path.to_str().expect("utf8"), "--id", "flag"]).expect("flags");
        let cfg = Config::resolve(&args).expect("valid");
        assert_eq!((cfg.id.as_str(), cfg.revoke_deadline), ("flag", Duration::from_secs(90)));
        assert_eq!(cfg.etcd.endpoints, vec!["http://e:2379"]);
        assert_eq!(cfg.churn_budget, DEFAULT_CHURN_BUDGET);
        assert_eq!(cfg.in_flight_alert_after, DEFAULT_IN_FLIGHT_ALERT_AFTER);
    }

    #[test]
    fn the_in_flight_alert_threshold_comes_from_file_flag_or_environment_and_is_not_zero() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "id = \"c1\"\nin_flight_alert_after = \"15m\"\n").expect("write");
        let args = Args::try_parse_from(["qslice-coordinator", "--config", path.to_str().expect("utf8")]).expect("flags");
        assert_eq!(Config::resolve(&args).expect("valid").alert_settings().in_flight_after, Duration::from_secs(900));
        let args = Args::try_parse_from(["qslice-coordinator", "--config", path.to_str().expect("utf8"), "--in-flight-alert-after", "2s"]).expect("flags");
        assert_eq!(Config::resolve(&args).expect("valid").in_flight_alert_after, Duration::from_secs(2));
        let args = Args::try_parse_from(["qslice-coordinator", "--id", "c1", "--in-flight-alert-after", "0s"]).expect("flags");
        assert!(Config::resolve(&args).expect_err("zero").to_string().starts_with("in_flight_alert_after"));
    }

    #[test]
    fn the_admin_token_comes_from_a_file_and_tls_files_go_in_pairs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("token");
        std::fs::write(&token, "t0ken\n").expect("write");
        let args = Args::try_parse_from(["qslice-coordinator", "--id", "c1", "--admin-token-file", token.to_str().expect("utf8")]).expect("flags");
        assert_eq!(Config::resolve(&args).expect("valid").admin.token.as_deref(), Some("t0ken"));
        std::fs::write(&token, "\n").expect("write");
        let err = Config::resolve(&args).expect_err("empty token");
        assert!(err.to_string().starts_with("admin.token_file"), "{err}");
        let args = Args::try_parse_from(["qslice-coordinator", "--id", "c1", "--admin-tls-cert", "/c.pem"]).expect("flags");
        assert!(Config::resolve(&args).expect_err("pair").to_string().starts_with("admin.tls_cert"));
        let args = Args::try_parse_from(["qslice-coordinator", "--id", "c1", "--admin-client-ca", "/ca.pem"]).expect("flags");
        assert!(Config::resolve(&args).expect_err("needs tls").to_string().starts_with("admin.client_ca"));
    }

    #[test]
    fn the_claim_deadline_comes_from_file_flag_or_environment_and_is_not_zero() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "id = \"c1\"\nclaim_deadline = \"750ms\"\n").expect("write");
        let args = Args::try_parse_from(["qslice-coordinator", "--config", path.to_str().expect("utf8")]).expect("flags");
        assert_eq!(Config::resolve(&args).expect("valid").claim_deadline, Duration::from_millis(750));
        let args = Args::try_parse_from(["qslice-coordinator", "--config", path.to_str().expect("utf8"), "--claim-deadline", "2s"]).expect("flags");
        assert_eq!(Config::resolve(&args).expect("valid").claim_deadline, Duration::from_secs(2));
        let args = Args::try_parse_from(["qslice-coordinator", "--id", "c1"]).expect("flags");
        assert_eq!(Config::resolve(&args).expect("valid").claim_deadline, DEFAULT_CLAIM_DEADLINE);
        let args = Args::try_parse_from(["qslice-coordinator", "--id", "c1", "--claim-deadline", "0s"]).expect("flags");
        assert!(Config::resolve(&args).expect_err("zero").to_string().starts_with("claim_deadline"));
    }
}
