//! Configuration pieces every qslice daemon reads the same way: the etcd connection
//! (flags over the file's `[etcd]` table), the log format, durations written as "5s", and
//! TOML files whose unknown keys are errors that name the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The smallest lease TTL stock etcd grants (it needs `--election-timeout` below 1 s for less).
pub const ETCD_MIN_TTL: Duration = Duration::from_secs(2);

/// The etcd connection flags, shared by every qslice daemon.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct EtcdArgs {
    /// etcd client URLs, comma-separated [default: http://127.0.0.1:2379].
    #[arg(long, env = "QSLICE_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Option<Vec<String>>,
    /// etcd user name (with --etcd-password).
    #[arg(long, env = "QSLICE_ETCD_USER")]
    pub etcd_user: Option<String>,
    /// etcd password.
    #[arg(long, env = "QSLICE_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,
    /// CA certificate (PEM) that signed etcd's server certificate.
    #[arg(long, env = "QSLICE_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd.
    #[arg(long, env = "QSLICE_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// Client key (PEM) for etcd.
    #[arg(long, env = "QSLICE_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
}

impl EtcdArgs {
    /// Resolves flags over the file's `[etcd]` table; user/password and cert/key go in pairs.
    pub fn resolve(&self, file: Option<FileEtcd>) -> Result<EtcdConfig, ConfigError> {
        let file = file.unwrap_or_default();
        let endpoints = self.etcd_endpoints.clone().or(file.endpoints).unwrap_or_else(|| vec!["http://127.0.0.1:2379".into()]);
        if endpoints.is_empty() {
            return Err(invalid("etcd.endpoints", "give at least one etcd client URL"));
        }
        let etcd = EtcdConfig {
            endpoints,
            user: self.etcd_user.clone().or(file.user),
            password: self.etcd_password.clone().or(file.password),
            ca: self.etcd_ca.clone().or(file.ca),
            cert: self.etcd_cert.clone().or(file.cert),
            key: self.etcd_key.clone().or(file.key),
        };
        if etcd.user.is_some() != etcd.password.is_some() {
            return Err(invalid("etcd.user", "etcd user and password go together"));
        }
        if etcd.cert.is_some() != etcd.key.is_some() {
            return Err(invalid("etcd.cert", "a client certificate needs its key (etcd.key), and the reverse"));
        }
        Ok(etcd)
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The `[etcd]` table of a configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEtcd {
    endpoints: Option<Vec<String>>,
    user: Option<String>,
    password: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

/// Durations in the file are strings such as "5s" or "500ms".
pub mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    /// Reads an optional duration string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| humantime::parse_duration(&t).map_err(|e| serde::de::Error::custom(format!("{t:?}: {e}")))).transpose()
    }
}

/// How to reach etcd.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EtcdConfig {
    /// Client URLs.
    pub endpoints: Vec<String>,
    /// User name, with `password`.
    pub user: Option<String>,
    /// Password (never printed).
    #[serde(skip)]
    pub password: Option<String>,
    /// CA certificate file.
    pub ca: Option<PathBuf>,
    /// Client certificate file.
    pub cert: Option<PathBuf>,
    /// Client key file.
    pub key: Option<PathBuf>,
}

/// Durations are printed as strings such as "5s".
pub mod humantime_serialize {
    use std::time::Duration;

    /// Writes a duration string.
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}

/// A configuration that cannot be used; the message names the key and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (names the key).
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{key}: {message}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong and what to do.
        message: String,
    },
}

/// A [`ConfigError::Invalid`] for `key`.
pub fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, message: message.into() }
}

/// Reads and parses a TOML configuration file; unknown keys are errors naming the key.
pub fn load_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })
}
