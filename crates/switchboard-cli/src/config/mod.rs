//! The server's configuration: the [`Config`] the binary runs with, and the
//! way there — the flags, environment and file ([`sources`]), read against
//! the file's schema ([`schema`]), merged key by key, then checked and
//! loaded ([`validate`]). A problem anywhere is a [`ConfigError`] (exit
//! code 2).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use switchboard::auth::jwt::JwtAuthenticator;
use switchboard::redis::RedisConfig;
use switchboard::tls::Tls;
use switchboard::{Limits, Security};

mod schema;
mod sources;
mod validate;

pub(crate) use schema::LogFormat;
pub(crate) use sources::Cli;

/// The merged, checked configuration the server runs with.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) listen: SocketAddr,
    pub(crate) log_format: LogFormat,
    pub(crate) log_level: String,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) limits: Limits,
    pub(crate) backend: BackendConfig,
    pub(crate) security: Security,
    /// The JWT authenticator, to re-read its key files on SIGHUP.
    pub(crate) jwt: Option<Arc<JwtAuthenticator>>,
    pub(crate) tls: Option<Tls>,
    /// Said once logging is up: what runs insecurely, and why it may.
    pub(crate) warnings: Vec<String>,
}

/// Which backend the server runs with.
#[derive(Debug)]
pub(crate) enum BackendConfig {
    Memory,
    Redis(RedisConfig),
}

/// A configuration problem; the binary exits with code 2.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error(
        "unknown environment variable {name}: the SWITCHBOARD_ prefix is reserved for options listed by --help"
    )]
    UnknownEnv { name: String },
    #[error("invalid value for {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

impl Cli {
    /// Merges defaults, the file, the environment and the flags, then
    /// checks the result.
    pub(crate) fn resolve(self) -> Result<Config, ConfigError> {
        validate::check(self.into_settings()?)
    }
}
