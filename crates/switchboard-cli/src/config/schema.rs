//! The configuration file's schema: the TOML tables and keys `--config`
//! accepts (unknown keys are errors that name the key), the value types
//! shared with the flags, and the defaults of the settings that are not a
//! library type's own default.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::ValueEnum;
use serde::Deserialize;
use switchboard::{Compression, DrainLimits, Limits, V1Limits};

/// `listen` when no source sets it: 127.0.0.1:8080.
pub(crate) fn default_listen() -> ListenAddr {
    ListenAddr::from(SocketAddr::from(([127, 0, 0, 1], 8080)))
}

/// `listen` as written: an IP address and port (`127.0.0.1:8080`,
/// `[::1]:8080`) or a host name and port (`localhost:8080`), resolved
/// when the configuration is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ListenAddr {
    /// The host as written: a name, or an IP address without brackets.
    pub(crate) host: String,
    pub(crate) port: u16,
    /// Set when the host is an IP address: nothing to resolve.
    pub(crate) ip: Option<SocketAddr>,
}

impl From<SocketAddr> for ListenAddr {
    fn from(addr: SocketAddr) -> Self {
        Self {
            host: addr.ip().to_string(),
            port: addr.port(),
            ip: Some(addr),
        }
    }
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Self::from(addr));
        }
        let example = "write HOST:PORT, e.g. 127.0.0.1:8080, localhost:8080 or [::1]:8080 (port 0 picks a free port)";
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(format!("{s:?} has no port: {example}"));
        };
        if host.is_empty() {
            return Err(format!("{s:?} has no host: {example}"));
        }
        if host.contains(':') || host.starts_with('[') {
            return Err(format!(
                "{s:?} is not HOST:PORT: write an IPv6 address in brackets, e.g. [::1]:8080"
            ));
        }
        if host.contains(char::is_whitespace) {
            return Err(format!("{s:?} is not HOST:PORT: {example}"));
        }
        let port = port
            .parse()
            .map_err(|_| format!("{s:?} has no valid port (0-65535): {example}"))?;
        Ok(Self {
            host: host.to_owned(),
            port,
            ip: None,
        })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            Some(addr) => addr.fmt(f),
            None => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `log_level` when no source sets it.
pub(crate) const DEFAULT_LOG_LEVEL: &str = "info";

/// `auth.mode = "none" | "jwt"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum AuthMode {
    None,
    Jwt,
}

/// `backend = "memory" | "redis"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum BackendKind {
    Memory,
    Redis,
}

/// `log_format = "text" | "json"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    Text,
    Json,
}

/// The whole file. Every key is optional: an absent key falls back to the
/// environment, the flags or the default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    pub(crate) listen: Option<ListenAddr>,
    pub(crate) log_format: Option<LogFormat>,
    pub(crate) log_level: Option<String>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(crate) shutdown_timeout: Option<Duration>,
    pub(crate) pid_file: Option<PathBuf>,
    #[serde(default)]
    pub(crate) limits: Option<Limits>,
    pub(crate) backend: Option<BackendKind>,
    pub(crate) node_id: Option<String>,
    #[serde(default)]
    pub(crate) redis: Option<RedisTable>,
    #[serde(default)]
    pub(crate) compression: Option<Compression>,
    /// The `[v1]` table: the `switchboard.v1` protocol's inboxes,
    /// deduplication and hello deadline (file only).
    #[serde(default)]
    pub(crate) v1: Option<V1Limits>,
    /// The `[drain]` table: how SIGTERM and `POST /api/drain` spread the
    /// clients' reconnects (`window`, `grace`).
    #[serde(default)]
    pub(crate) drain: Option<DrainLimits>,
    pub(crate) insecure_allow_anonymous: Option<bool>,
    pub(crate) insecure_open_api: Option<bool>,
    pub(crate) allowed_origins: Option<Vec<String>>,
    pub(crate) allowed_hosts: Option<Vec<String>>,
    pub(crate) trusted_proxies: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) auth: Option<AuthTable>,
    #[serde(default)]
    pub(crate) api: Option<ApiTable>,
    #[serde(default)]
    pub(crate) tls: Option<TlsTable>,
}

/// The `[auth]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuthTable {
    pub(crate) mode: Option<AuthMode>,
    pub(crate) jwt_secret: Option<String>,
    pub(crate) jwt_public_key: Option<PathBuf>,
    pub(crate) jwt_jwks: Option<PathBuf>,
    pub(crate) jwks_require_kid: Option<bool>,
    pub(crate) issuer: Option<String>,
    pub(crate) audience: Option<String>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(crate) clock_skew: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(crate) expiry_grace: Option<Duration>,
}

/// The `[api]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ApiTable {
    pub(crate) keys: Option<Vec<String>>,
    pub(crate) protect_metrics: Option<bool>,
    pub(crate) protect_heartbeat: Option<bool>,
}

/// The `[tls]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsTable {
    pub(crate) cert: Option<PathBuf>,
    pub(crate) key: Option<PathBuf>,
}

/// The `[redis]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RedisTable {
    pub(crate) url: Option<String>,
    pub(crate) key_prefix: Option<String>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(crate) presence_ttl: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(crate) request_timeout: Option<Duration>,
    pub(crate) location_cache: Option<usize>,
}

/// A duration written as the flags take it: `"25s"`, `"500ms"`, `"0"`.
fn opt_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    switchboard::duration::parse(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}
