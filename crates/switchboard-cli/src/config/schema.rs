//! The configuration file's schema: the TOML tables and keys `--config`
//! accepts (unknown keys are errors that name the key), the value types
//! shared with the flags, and the defaults of the settings that are not a
//! library type's own default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;
use serde::Deserialize;
use switchboard::{Compression, Limits};

/// `listen` when no source sets it.
pub(crate) const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    8080,
));

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
    pub(crate) listen: Option<SocketAddr>,
    pub(crate) log_format: Option<LogFormat>,
    pub(crate) log_level: Option<String>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(crate) shutdown_timeout: Option<Duration>,
    #[serde(default)]
    pub(crate) limits: Option<Limits>,
    pub(crate) backend: Option<BackendKind>,
    pub(crate) node_id: Option<String>,
    #[serde(default)]
    pub(crate) redis: Option<RedisTable>,
    #[serde(default)]
    pub(crate) compression: Option<Compression>,
    pub(crate) insecure_allow_anonymous: Option<bool>,
    pub(crate) insecure_open_api: Option<bool>,
    pub(crate) allowed_origins: Option<Vec<String>>,
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
}

/// A duration written as the flags take it: `"25s"`, `"500ms"`, `"0"`.
fn opt_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    switchboard::duration::parse(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}
