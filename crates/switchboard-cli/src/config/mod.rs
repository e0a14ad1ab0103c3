//! The server's configuration: the [`Config`] the binary runs with, and the
//! way there — the flags, environment and file ([`sources`]), read against
//! the file's schema ([`schema`]), merged key by key, then checked and
//! loaded ([`validate`]). A problem anywhere is a [`ConfigError`] (exit
//! code 2).

use std::fmt;
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

pub(crate) use schema::{ListenAddr, LogFormat};
pub(crate) use sources::Cli;

/// The merged, checked configuration the server runs with.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) listen: Listen,
    pub(crate) log_format: LogFormat,
    pub(crate) log_level: String,
    pub(crate) shutdown_timeout: Duration,
    /// Where to write the process ID once listening (absolute).
    pub(crate) pid_file: Option<PathBuf>,
    pub(crate) limits: Limits,
    pub(crate) backend: BackendConfig,
    pub(crate) security: Security,
    /// `allowed_origins` as configured (`None`: any origin), for the log.
    pub(crate) allowed_origins: Option<Vec<String>>,
    /// `trusted_proxies` as configured, for the log.
    pub(crate) trusted_proxies: Vec<String>,
    /// The JWT authenticator, to re-read its key files on SIGHUP.
    pub(crate) jwt: Option<Arc<JwtAuthenticator>>,
    pub(crate) tls: Option<Tls>,
    /// Said once logging is up: what runs insecurely, and why it may.
    pub(crate) warnings: Vec<String>,
}

/// `listen` as written, and the addresses it resolved to, in the order
/// the server tries them.
#[derive(Debug, Clone)]
pub(crate) struct Listen {
    pub(crate) written: ListenAddr,
    /// Never empty.
    pub(crate) addrs: Vec<SocketAddr>,
}

impl Listen {
    /// Whether every address is loopback: only then may the server run
    /// without authentication or API keys.
    pub(crate) fn is_loopback(&self) -> bool {
        self.addrs.iter().all(|addr| addr.ip().is_loopback())
    }

    /// Whether `written` is a name rather than an IP address.
    pub(crate) fn is_name(&self) -> bool {
        self.written.ip.is_none()
    }
}

/// The address as written, and for a name what it resolved to:
/// `localhost:8080 (127.0.0.1:8080)`.
impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.written)?;
        if self.is_name() {
            let addrs: Vec<String> = self.addrs.iter().map(SocketAddr::to_string).collect();
            write!(f, " ({})", addrs.join(", "))?;
        }
        Ok(())
    }
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
