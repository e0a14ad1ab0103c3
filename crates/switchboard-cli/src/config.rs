//! The server's configuration: defaults, then a TOML file, then
//! `SWITCHBOARD_*` environment variables, then flags — each later source
//! overriding the earlier ones, key by key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Deserialize;
use switchboard::auth::jwt::{JwtAuthenticator, JwtConfig, JwtKey};
use switchboard::auth::{AllowedOrigins, ApiKeys, TrustedProxies};
use switchboard::redis::{RedisConfig, RedisConfigError};
use switchboard::tls::{Tls, TlsError};
use switchboard::{Compression, DuplicateIds, Limits, Security, SlowConsumer};

/// A WebSocket messaging server: relay by client ID, topics, chat, echo, and
/// an HTTP API for your backend.
///
/// Every option can also be set by the environment variable shown, or in
/// the TOML file given with --config (keys as in docs/configuration.md).
/// Precedence: flag, then environment, then file, then default.
#[derive(Debug, Parser)]
#[command(name = "switchboard", version, about, long_about)]
pub(crate) struct Cli {
    /// TOML configuration file.
    #[arg(long, env = "SWITCHBOARD_CONFIG", value_name = "PATH")]
    pub(crate) config: Option<PathBuf>,
    /// Address to listen on; port 0 picks a free port [default: 127.0.0.1:8080].
    #[arg(long, env = "SWITCHBOARD_LISTEN", value_name = "ADDR")]
    pub(crate) listen: Option<SocketAddr>,
    /// Log format [default: text].
    #[arg(long, env = "SWITCHBOARD_LOG_FORMAT", value_enum)]
    pub(crate) log_format: Option<LogFormat>,
    /// Log filter, e.g. "info" or "switchboard=debug" [default: info].
    #[arg(long, env = "SWITCHBOARD_LOG_LEVEL", value_name = "FILTER")]
    pub(crate) log_level: Option<String>,
    /// How long shutdown waits for connections to close [default: 10s].
    #[arg(long, env = "SWITCHBOARD_SHUTDOWN_TIMEOUT", value_parser = duration, value_name = "DURATION")]
    pub(crate) shutdown_timeout: Option<Duration>,

    /// Where client IDs and topics live: "memory" (this process) or "redis"
    /// (several nodes sharing one Redis 7) [default: memory].
    #[arg(
        long,
        env = "SWITCHBOARD_BACKEND",
        value_enum,
        help_heading = "Cluster"
    )]
    pub(crate) backend: Option<BackendKind>,
    /// This node's name in the cluster, unique per node: ASCII letters,
    /// digits, - _ . : [default: <host name>-<pid>].
    #[arg(
        long,
        env = "SWITCHBOARD_NODE_ID",
        value_name = "ID",
        help_heading = "Cluster"
    )]
    pub(crate) node_id: Option<String>,
    /// Redis for backend = "redis", e.g. redis://127.0.0.1:6379/.
    #[arg(
        long,
        env = "SWITCHBOARD_REDIS_URL",
        value_name = "URL",
        help_heading = "Cluster"
    )]
    pub(crate) redis_url: Option<String>,
    /// Prefix of every Redis key and channel, so several clusters can share
    /// one Redis [default: switchboard].
    #[arg(
        long,
        env = "SWITCHBOARD_REDIS_KEY_PREFIX",
        value_name = "PREFIX",
        help_heading = "Cluster"
    )]
    pub(crate) redis_key_prefix: Option<String>,
    /// How long the IDs of a node that stopped refreshing (killed, or cut
    /// off from Redis) are still reported online; refreshed every third of
    /// it [default: 10s].
    #[arg(long, env = "SWITCHBOARD_REDIS_PRESENCE_TTL", value_parser = duration, value_name = "DURATION", help_heading = "Cluster")]
    pub(crate) redis_presence_ttl: Option<Duration>,
    /// The longest a Redis command, or a cross-node send waiting for the
    /// other nodes, may take [default: 2s].
    #[arg(long, env = "SWITCHBOARD_REDIS_REQUEST_TIMEOUT", value_parser = duration, value_name = "DURATION", help_heading = "Cluster")]
    pub(crate) redis_request_timeout: Option<Duration>,

    /// Largest message a client may send, in bytes [default: 65536].
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_MESSAGE_SIZE",
        value_name = "BYTES",
        help_heading = "Limits"
    )]
    pub(crate) max_message_size: Option<usize>,
    /// Largest frame a client may send, in bytes [default: 65536].
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_FRAME_SIZE",
        value_name = "BYTES",
        help_heading = "Limits"
    )]
    pub(crate) max_frame_size: Option<usize>,
    /// Frames that may wait to be sent to one client [default: 1024].
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_QUEUED_MESSAGES",
        value_name = "N",
        help_heading = "Limits"
    )]
    pub(crate) max_queued_messages: Option<usize>,
    /// Bytes that may wait to be sent to one client [default: 1048576].
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_QUEUED_BYTES",
        value_name = "BYTES",
        help_heading = "Limits"
    )]
    pub(crate) max_queued_bytes: Option<usize>,
    /// Ping a client silent for this long; 0 disables [default: 25s].
    #[arg(long, env = "SWITCHBOARD_PING_INTERVAL", value_parser = duration, value_name = "DURATION", help_heading = "Limits")]
    pub(crate) ping_interval: Option<Duration>,
    /// Drop a client silent this long after a ping [default: 10s].
    #[arg(long, env = "SWITCHBOARD_PONG_TIMEOUT", value_parser = duration, value_name = "DURATION", help_heading = "Limits")]
    pub(crate) pong_timeout: Option<Duration>,
    /// Wait this long for the client's close frame [default: 5s].
    #[arg(long, env = "SWITCHBOARD_CLOSE_TIMEOUT", value_parser = duration, value_name = "DURATION", help_heading = "Limits")]
    pub(crate) close_timeout: Option<Duration>,
    /// Drop an HTTP client that sends no headers for this long [default: 10s].
    #[arg(long, env = "SWITCHBOARD_HANDSHAKE_TIMEOUT", value_parser = duration, value_name = "DURATION", help_heading = "Limits")]
    pub(crate) handshake_timeout: Option<Duration>,
    /// Open TCP connections before new ones get 503 [default: 100000].
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_CONNECTIONS",
        value_name = "N",
        help_heading = "Limits"
    )]
    pub(crate) max_connections: Option<usize>,
    /// Targets in one relay frame or /api/send [default: 10000].
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_TARGETS",
        value_name = "N",
        help_heading = "Limits"
    )]
    pub(crate) max_targets: Option<usize>,
    /// Topics one connection may have joined; beyond → error frame
    /// too_many_topics; 0 = no limit [default: 1000].
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_TOPICS_PER_CONNECTION",
        value_name = "N",
        help_heading = "Limits"
    )]
    pub(crate) max_topics_per_connection: Option<usize>,
    /// A second connection with the same client ID [default: allow].
    #[arg(
        long,
        env = "SWITCHBOARD_DUPLICATE_IDS",
        value_enum,
        help_heading = "Limits"
    )]
    pub(crate) duplicate_ids: Option<DuplicateIdsArg>,
    /// Messages per second one client may send; 0 = no limit [default: 10000].
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_MESSAGE_RATE",
        value_name = "N",
        help_heading = "Limits"
    )]
    pub(crate) max_message_rate: Option<u32>,
    /// Messages a client may send at once above the rate [default: 20000].
    #[arg(
        long,
        env = "SWITCHBOARD_MESSAGE_BURST",
        value_name = "N",
        help_heading = "Limits"
    )]
    pub(crate) message_burst: Option<u32>,
    /// When a client's outgoing queue is full [default: close].
    #[arg(
        long,
        env = "SWITCHBOARD_SLOW_CONSUMER",
        value_enum,
        help_heading = "Limits"
    )]
    pub(crate) slow_consumer: Option<SlowConsumerArg>,
    /// Largest HTTP request head, in bytes; larger gets 431 [default: 16384].
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_HEADER_SIZE",
        value_name = "BYTES",
        help_heading = "Limits"
    )]
    pub(crate) max_header_size: Option<usize>,
    /// Open WebSockets per client IP (IPv6: per /64); beyond → 429; 0 = no
    /// limit [default: 0].
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_CONNECTIONS_PER_IP",
        value_name = "N",
        help_heading = "Limits"
    )]
    pub(crate) max_connections_per_ip: Option<usize>,
    /// New WebSockets per second per client IP; beyond → 429; 0 = no limit
    /// [default: 0].
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_CONNECTION_RATE_PER_IP",
        value_name = "N",
        help_heading = "Limits"
    )]
    pub(crate) max_connection_rate_per_ip: Option<u32>,

    /// Client authentication: "none" (clients pick their ID with ?id=) or
    /// "jwt" (the ID is the token's sub) [default: none].
    #[arg(
        long,
        env = "SWITCHBOARD_AUTH_MODE",
        value_enum,
        help_heading = "Security"
    )]
    pub(crate) auth_mode: Option<AuthMode>,
    /// HS256 shared secret, at least 32 bytes; prefer the environment
    /// variable, flags show in `ps`.
    #[arg(
        long,
        env = "SWITCHBOARD_AUTH_JWT_SECRET",
        value_name = "SECRET",
        hide_env_values = true,
        help_heading = "Security"
    )]
    pub(crate) auth_jwt_secret: Option<String>,
    /// PEM public key file for RS256/PS256, ES256/ES384 or EdDSA tokens;
    /// re-read on SIGHUP.
    #[arg(
        long,
        env = "SWITCHBOARD_AUTH_JWT_PUBLIC_KEY",
        value_name = "PATH",
        help_heading = "Security"
    )]
    pub(crate) auth_jwt_public_key: Option<PathBuf>,
    /// JWKS file ({"keys":[…]}); tokens pick a key by kid; re-read on SIGHUP.
    #[arg(
        long,
        env = "SWITCHBOARD_AUTH_JWT_JWKS",
        value_name = "PATH",
        help_heading = "Security"
    )]
    pub(crate) auth_jwt_jwks: Option<PathBuf>,
    /// The iss tokens must have [default: not checked].
    #[arg(
        long,
        env = "SWITCHBOARD_AUTH_ISSUER",
        value_name = "ISS",
        help_heading = "Security"
    )]
    pub(crate) auth_issuer: Option<String>,
    /// The aud tokens must have [default: not checked].
    #[arg(
        long,
        env = "SWITCHBOARD_AUTH_AUDIENCE",
        value_name = "AUD",
        help_heading = "Security"
    )]
    pub(crate) auth_audience: Option<String>,
    /// Tolerance for clock differences on exp and nbf [default: 30s].
    #[arg(long, env = "SWITCHBOARD_AUTH_CLOCK_SKEW", value_parser = duration, value_name = "DURATION", help_heading = "Security")]
    pub(crate) auth_clock_skew: Option<Duration>,
    /// How long a connection outlives its token's exp before it is closed
    /// with 4002 [default: 30s].
    #[arg(long, env = "SWITCHBOARD_AUTH_EXPIRY_GRACE", value_parser = duration, value_name = "DURATION", help_heading = "Security")]
    pub(crate) auth_expiry_grace: Option<Duration>,
    /// Allow auth mode "none" on a non-loopback address (anyone may connect
    /// as any ID) [default: false].
    #[arg(
        long,
        env = "SWITCHBOARD_INSECURE_ALLOW_ANONYMOUS",
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true",
        help_heading = "Security"
    )]
    pub(crate) insecure_allow_anonymous: Option<bool>,
    /// Keys for /api (Authorization: Bearer <key>), comma-separated, each
    /// at least 16 characters; several allow rotation.
    #[arg(
        long,
        env = "SWITCHBOARD_API_KEYS",
        value_name = "KEYS",
        value_delimiter = ',',
        hide_env_values = true,
        help_heading = "Security"
    )]
    pub(crate) api_keys: Option<Vec<String>>,
    /// Whether /metrics needs an API key too [default: true].
    #[arg(
        long,
        env = "SWITCHBOARD_API_PROTECT_METRICS",
        value_name = "BOOL",
        help_heading = "Security"
    )]
    pub(crate) api_protect_metrics: Option<bool>,
    /// Whether /heartbeat needs an API key [default: false].
    #[arg(
        long,
        env = "SWITCHBOARD_API_PROTECT_HEARTBEAT",
        value_name = "BOOL",
        help_heading = "Security"
    )]
    pub(crate) api_protect_heartbeat: Option<bool>,
    /// Allow an /api without keys on a non-loopback address [default: false].
    #[arg(
        long,
        env = "SWITCHBOARD_INSECURE_OPEN_API",
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true",
        help_heading = "Security"
    )]
    pub(crate) insecure_open_api: Option<bool>,
    /// Origins allowed to open WebSockets, comma-separated:
    /// https://app.example.com, https://*.example.com [default: any].
    #[arg(
        long,
        env = "SWITCHBOARD_ALLOWED_ORIGINS",
        value_name = "ORIGINS",
        value_delimiter = ',',
        help_heading = "Security"
    )]
    pub(crate) allowed_origins: Option<Vec<String>>,
    /// Proxies (addresses or CIDR ranges, comma-separated) whose
    /// X-Forwarded-For is believed [default: none].
    #[arg(
        long,
        env = "SWITCHBOARD_TRUSTED_PROXIES",
        value_name = "CIDRS",
        value_delimiter = ',',
        help_heading = "Security"
    )]
    pub(crate) trusted_proxies: Option<Vec<String>>,
    /// PEM certificate chain: serve HTTPS and WSS (with --tls-key);
    /// re-read on SIGHUP.
    #[arg(
        long,
        env = "SWITCHBOARD_TLS_CERT",
        value_name = "PATH",
        help_heading = "Security"
    )]
    pub(crate) tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert; re-read on SIGHUP.
    #[arg(
        long,
        env = "SWITCHBOARD_TLS_KEY",
        value_name = "PATH",
        help_heading = "Security"
    )]
    pub(crate) tls_key: Option<PathBuf>,

    /// Accept permessage-deflate when clients offer it [default: false].
    #[arg(
        long,
        env = "SWITCHBOARD_COMPRESSION",
        value_name = "BOOL",
        help_heading = "Compression"
    )]
    pub(crate) compression: Option<bool>,
    /// Messages shorter than this are sent uncompressed [default: 256].
    #[arg(
        long,
        env = "SWITCHBOARD_COMPRESSION_MIN_SIZE",
        value_name = "BYTES",
        help_heading = "Compression"
    )]
    pub(crate) compression_min_size: Option<usize>,
    /// zlib level 0-9 [default: 1].
    #[arg(
        long,
        env = "SWITCHBOARD_COMPRESSION_LEVEL",
        value_name = "N",
        help_heading = "Compression"
    )]
    pub(crate) compression_level: Option<u32>,
    /// Our compressor's window, 9-15 bits [default: 15].
    #[arg(
        long,
        env = "SWITCHBOARD_COMPRESSION_SERVER_MAX_WINDOW_BITS",
        value_name = "BITS",
        help_heading = "Compression"
    )]
    pub(crate) compression_server_max_window_bits: Option<u8>,
    /// Largest window clients may compress with, 9-15 bits [default: 15].
    #[arg(
        long,
        env = "SWITCHBOARD_COMPRESSION_CLIENT_MAX_WINDOW_BITS",
        value_name = "BITS",
        help_heading = "Compression"
    )]
    pub(crate) compression_client_max_window_bits: Option<u8>,
    /// Reset our compressor after every message [default: false].
    #[arg(
        long,
        env = "SWITCHBOARD_COMPRESSION_SERVER_NO_CONTEXT_TAKEOVER",
        value_name = "BOOL",
        help_heading = "Compression"
    )]
    pub(crate) compression_server_no_context_takeover: Option<bool>,
    /// Ask clients to reset theirs after every message [default: false].
    #[arg(
        long,
        env = "SWITCHBOARD_COMPRESSION_CLIENT_NO_CONTEXT_TAKEOVER",
        value_name = "BOOL",
        help_heading = "Compression"
    )]
    pub(crate) compression_client_no_context_takeover: Option<bool>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum SlowConsumerArg {
    Close,
    DropOldest,
}

impl From<SlowConsumerArg> for SlowConsumer {
    fn from(arg: SlowConsumerArg) -> Self {
        match arg {
            SlowConsumerArg::Close => Self::Close,
            SlowConsumerArg::DropOldest => Self::DropOldest,
        }
    }
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum DuplicateIdsArg {
    Allow,
    ReplaceOldest,
    RejectNew,
}

impl From<DuplicateIdsArg> for DuplicateIds {
    fn from(arg: DuplicateIdsArg) -> Self {
        match arg {
            DuplicateIdsArg::Allow => Self::Allow,
            DuplicateIdsArg::ReplaceOldest => Self::ReplaceOldest,
            DuplicateIdsArg::RejectNew => Self::RejectNew,
        }
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    switchboard::duration::parse(s)
}

/// The config file's shape. Unknown keys are errors that name the key.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    log_format: Option<LogFormat>,
    log_level: Option<String>,
    #[serde(default, deserialize_with = "opt_duration")]
    shutdown_timeout: Option<Duration>,
    #[serde(default)]
    limits: Option<Limits>,
    backend: Option<BackendKind>,
    node_id: Option<String>,
    #[serde(default)]
    redis: Option<RedisFile>,
    #[serde(default)]
    compression: Option<Compression>,
    insecure_allow_anonymous: Option<bool>,
    insecure_open_api: Option<bool>,
    allowed_origins: Option<Vec<String>>,
    trusted_proxies: Option<Vec<String>>,
    #[serde(default)]
    auth: Option<AuthFile>,
    #[serde(default)]
    api: Option<ApiFile>,
    #[serde(default)]
    tls: Option<TlsFile>,
}

/// The `[auth]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    mode: Option<AuthMode>,
    jwt_secret: Option<String>,
    jwt_public_key: Option<PathBuf>,
    jwt_jwks: Option<PathBuf>,
    issuer: Option<String>,
    audience: Option<String>,
    #[serde(default, deserialize_with = "opt_duration")]
    clock_skew: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    expiry_grace: Option<Duration>,
}

/// The `[api]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiFile {
    keys: Option<Vec<String>>,
    protect_metrics: Option<bool>,
    protect_heartbeat: Option<bool>,
}

/// The `[tls]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

/// The `[redis]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RedisFile {
    url: Option<String>,
    key_prefix: Option<String>,
    #[serde(default, deserialize_with = "opt_duration")]
    presence_ttl: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    request_timeout: Option<Duration>,
}

fn opt_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    duration(&s).map(Some).map_err(serde::de::Error::custom)
}

/// The merged configuration the server runs with.
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

/// The security half of [`Config`].
struct Secured {
    security: Security,
    jwt: Option<Arc<JwtAuthenticator>>,
    tls: Option<Tls>,
    warnings: Vec<String>,
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
    /// Merges defaults, the file, the environment and the flags (clap has
    /// already put environment values into unset flags).
    pub(crate) fn resolve(self) -> Result<Config, ConfigError> {
        check_env_names()?;
        let mut file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let backend = self.backend_config(&file)?;
        let mut limits = file.limits.take().unwrap_or_default();
        macro_rules! set {
            ($($field:ident),*) => {$(
                if let Some(v) = self.$field { limits.$field = v.into(); }
            )*};
        }
        set!(
            max_message_size,
            max_frame_size,
            max_queued_messages,
            max_queued_bytes,
            ping_interval,
            pong_timeout,
            close_timeout,
            handshake_timeout,
            max_connections,
            max_targets,
            max_topics_per_connection,
            duplicate_ids,
            max_message_rate,
            message_burst,
            slow_consumer,
            max_header_size,
            max_connections_per_ip,
            max_connection_rate_per_ip
        );
        limits.compression = file.compression.take().unwrap_or_default();
        let c = &mut limits.compression;
        macro_rules! set_compression {
            ($($flag:ident => $field:ident),*) => {$(
                if let Some(v) = self.$flag { c.$field = v; }
            )*};
        }
        set_compression!(
            compression => enabled,
            compression_min_size => min_size,
            compression_level => level,
            compression_server_max_window_bits => server_max_window_bits,
            compression_client_max_window_bits => client_max_window_bits,
            compression_server_no_context_takeover => server_no_context_takeover,
            compression_client_no_context_takeover => client_no_context_takeover
        );
        c.validate().map_err(|message| ConfigError::Invalid {
            key: "compression",
            message,
        })?;
        validate(&limits)?;
        let listen = self
            .listen
            .or(file.listen)
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080)));
        let base = self
            .config
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_owned)
            .unwrap_or_default();
        let secured = self.security_config(&file, &base, listen)?;
        Ok(Config {
            listen,
            log_format: self
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            log_level: self
                .log_level
                .or(file.log_level)
                .unwrap_or_else(|| "info".to_owned()),
            shutdown_timeout: self
                .shutdown_timeout
                .or(file.shutdown_timeout)
                .unwrap_or(switchboard::DEFAULT_SHUTDOWN_TIMEOUT),
            limits,
            backend,
            security: secured.security,
            jwt: secured.jwt,
            tls: secured.tls,
            warnings: secured.warnings,
        })
    }

    /// `[auth]`, `[api]`, `[tls]`, origins and proxies, checked and loaded
    /// (key files and certificates are read now, so a bad one stops the
    /// server before it binds), and the safe defaults: no anonymous clients
    /// and no open API on a non-loopback address unless asked for.
    fn security_config(
        &self,
        file: &FileConfig,
        base: &Path,
        listen: SocketAddr,
    ) -> Result<Secured, ConfigError> {
        let invalid = |key: &'static str, message: String| ConfigError::Invalid { key, message };
        let auth = file.auth.as_ref();
        let api = file.api.as_ref();
        // Paths in the file are relative to the file.
        let in_file = |path: &PathBuf| base.join(path);
        let mode = self
            .auth_mode
            .or_else(|| auth.and_then(|a| a.mode))
            .unwrap_or(AuthMode::None);
        let secret = self
            .auth_jwt_secret
            .clone()
            .or_else(|| auth.and_then(|a| a.jwt_secret.clone()));
        let public_key = self
            .auth_jwt_public_key
            .clone()
            .or_else(|| auth.and_then(|a| a.jwt_public_key.as_ref().map(in_file)));
        let jwks = self
            .auth_jwt_jwks
            .clone()
            .or_else(|| auth.and_then(|a| a.jwt_jwks.as_ref().map(in_file)));
        let issuer = self
            .auth_issuer
            .clone()
            .or_else(|| auth.and_then(|a| a.issuer.clone()));
        let audience = self
            .auth_audience
            .clone()
            .or_else(|| auth.and_then(|a| a.audience.clone()));
        let mut security = Security::default();
        if let Some(grace) = self
            .auth_expiry_grace
            .or_else(|| auth.and_then(|a| a.expiry_grace))
        {
            security.expiry_grace = grace;
        }
        let given: Vec<&str> = [
            (secret.is_some(), "auth.jwt_secret"),
            (public_key.is_some(), "auth.jwt_public_key"),
            (jwks.is_some(), "auth.jwt_jwks"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect();
        let mut jwt = None;
        match mode {
            AuthMode::None => {
                let stray = given
                    .iter()
                    .copied()
                    .chain(issuer.is_some().then_some("auth.issuer"))
                    .chain(audience.is_some().then_some("auth.audience"))
                    .next();
                if let Some(stray) = stray {
                    return Err(invalid(
                        "auth.mode",
                        format!(
                            "is \"none\" but {stray} is set: set auth.mode = \"jwt\" (--auth-mode jwt) to authenticate clients, or remove {stray}"
                        ),
                    ));
                }
            }
            AuthMode::Jwt => {
                let (key, name) = match (secret, public_key, jwks) {
                    (Some(secret), None, None) => {
                        (JwtKey::Secret(secret.into_bytes()), "auth.jwt_secret")
                    }
                    (None, Some(path), None) => {
                        (JwtKey::PublicKeyFile(path), "auth.jwt_public_key")
                    }
                    (None, None, Some(path)) => (JwtKey::JwksFile(path), "auth.jwt_jwks"),
                    (None, None, None) => {
                        return Err(invalid(
                            "auth.mode",
                            "is \"jwt\" but no key is set: set auth.jwt_secret (HS256), auth.jwt_public_key (a PEM file) or auth.jwt_jwks (a JWKS file)".to_owned(),
                        ));
                    }
                    _ => {
                        return Err(invalid(
                            "auth.mode",
                            format!(
                                "takes one key, but {} are set: keep one",
                                given.join(" and ")
                            ),
                        ));
                    }
                };
                let mut config = JwtConfig::new(key);
                config.issuer = issuer;
                config.audience = audience;
                if let Some(skew) = self
                    .auth_clock_skew
                    .or_else(|| auth.and_then(|a| a.clock_skew))
                {
                    config.clock_skew = skew;
                }
                let authenticator = Arc::new(
                    JwtAuthenticator::new(config).map_err(|err| invalid(name, err.to_string()))?,
                );
                security.authenticator = Some(authenticator.clone());
                jwt = Some(authenticator);
            }
        }

        let keys = self
            .api_keys
            .clone()
            .or_else(|| api.and_then(|a| a.keys.clone()))
            .unwrap_or_default();
        security.api_keys =
            ApiKeys::new(&keys).map_err(|err| invalid("api.keys", err.to_string()))?;
        if let Some(protect) = self
            .api_protect_metrics
            .or_else(|| api.and_then(|a| a.protect_metrics))
        {
            security.protect_metrics = protect;
        }
        if let Some(protect) = self
            .api_protect_heartbeat
            .or_else(|| api.and_then(|a| a.protect_heartbeat))
        {
            security.protect_heartbeat = protect;
        }
        if let Some(origins) = self
            .allowed_origins
            .clone()
            .or_else(|| file.allowed_origins.clone())
        {
            security.allowed_origins = Some(
                AllowedOrigins::new(&origins)
                    .map_err(|err| invalid("allowed_origins", err.to_string()))?,
            );
        }
        if let Some(proxies) = self
            .trusted_proxies
            .clone()
            .or_else(|| file.trusted_proxies.clone())
        {
            security.trusted_proxies = TrustedProxies::new(&proxies)
                .map_err(|err| invalid("trusted_proxies", err.to_string()))?;
        }

        let table = file.tls.as_ref();
        let cert = self
            .tls_cert
            .clone()
            .or_else(|| table.and_then(|t| t.cert.as_ref().map(in_file)));
        let key = self
            .tls_key
            .clone()
            .or_else(|| table.and_then(|t| t.key.as_ref().map(in_file)));
        let tls = match (cert, key) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    "tls.key",
                    "is required with tls.cert: the certificate's private key, in PEM".to_owned(),
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "tls.cert",
                    "is required with tls.key: the certificate chain, in PEM".to_owned(),
                ));
            }
            (Some(cert), Some(key)) => {
                let key_path = key.clone();
                let tls = Tls::from_pem_files(cert, key).map_err(|err| {
                    let name = match &err {
                        TlsError::NoKey { .. } => "tls.key",
                        TlsError::Read { path, .. } if *path == key_path => "tls.key",
                        _ => "tls.cert",
                    };
                    invalid(name, err.to_string())
                })?;
                Some(tls)
            }
        };

        // The safe defaults.
        let mut warnings = Vec::new();
        let loopback = listen.ip().is_loopback();
        if mode == AuthMode::None && !loopback {
            if !self
                .insecure_allow_anonymous
                .or(file.insecure_allow_anonymous)
                .unwrap_or(false)
            {
                return Err(invalid(
                    "auth.mode",
                    format!(
                        "is \"none\" and listen = {listen} is not a loopback address: anyone who reaches it could connect as any client ID and read its messages. Set auth.mode = \"jwt\" with a key (docs/security.md), listen on 127.0.0.1, or pass --insecure-allow-anonymous to run like this anyway"
                    ),
                ));
            }
            warnings.push(format!(
                "auth.mode = \"none\" on {listen}, which is not loopback (--insecure-allow-anonymous): anyone who can reach it may connect as any client ID and read its messages"
            ));
        }
        if security.api_keys.is_empty() {
            if !loopback
                && !self
                    .insecure_open_api
                    .or(file.insecure_open_api)
                    .unwrap_or(false)
            {
                return Err(invalid(
                    "api.keys",
                    format!(
                        "is empty and listen = {listen} is not a loopback address: anyone who reaches it could send to any client and disconnect anyone through /api. Set api.keys (e.g. `openssl rand -hex 32`), listen on 127.0.0.1, or pass --insecure-open-api to run like this anyway"
                    ),
                ));
            }
            warnings.push(format!(
                "no api.keys: /api and /metrics are open to anyone who can reach {listen}"
            ));
        }
        Ok(Secured {
            security,
            jwt,
            tls,
            warnings,
        })
    }

    /// `backend` and, for Redis, its settings: flag or environment, then
    /// the file, then the defaults of [`RedisConfig`].
    fn backend_config(&self, file: &FileConfig) -> Result<BackendConfig, ConfigError> {
        let kind = self.backend.or(file.backend).unwrap_or(BackendKind::Memory);
        if kind == BackendKind::Memory {
            return Ok(BackendConfig::Memory);
        }
        let table = file.redis.as_ref();
        let url = self
            .redis_url
            .clone()
            .or_else(|| table.and_then(|t| t.url.clone()))
            .ok_or_else(|| ConfigError::Invalid {
                key: "redis.url",
                message: "is required with backend = \"redis\" (--redis-url, SWITCHBOARD_REDIS_URL or url in [redis])".to_owned(),
            })?;
        let mut config = RedisConfig::new(url);
        if let Some(node_id) = self.node_id.clone().or_else(|| file.node_id.clone()) {
            config.node_id = node_id;
        }
        if let Some(prefix) = self
            .redis_key_prefix
            .clone()
            .or_else(|| table.and_then(|t| t.key_prefix.clone()))
        {
            config.key_prefix = prefix;
        }
        if let Some(ttl) = self
            .redis_presence_ttl
            .or_else(|| table.and_then(|t| t.presence_ttl))
        {
            config.presence_ttl = ttl;
        }
        if let Some(timeout) = self
            .redis_request_timeout
            .or_else(|| table.and_then(|t| t.request_timeout))
        {
            config.request_timeout = timeout;
        }
        config.validate().map_err(|err| {
            let key = match err {
                RedisConfigError::Url { .. } => "redis.url",
                RedisConfigError::NodeId(_) => "node_id",
                RedisConfigError::KeyPrefix(_) => "redis.key_prefix",
                RedisConfigError::PresenceTtl(_) => "redis.presence_ttl",
                RedisConfigError::RequestTimeout(_) => "redis.request_timeout",
                _ => "redis",
            };
            ConfigError::Invalid {
                key,
                message: err.to_string(),
            }
        })?;
        Ok(BackendConfig::Redis(config))
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

/// A misspelt `SWITCHBOARD_*` variable would otherwise be ignored silently.
fn check_env_names() -> Result<(), ConfigError> {
    use clap::CommandFactory as _;
    let command = Cli::command();
    let known: Vec<String> = command
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|name| name.to_string_lossy().into_owned())
        .collect();
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("SWITCHBOARD_") && !known.iter().any(|k| *k == name) {
            return Err(ConfigError::UnknownEnv {
                name: name.into_owned(),
            });
        }
    }
    Ok(())
}

fn validate(limits: &Limits) -> Result<(), ConfigError> {
    let positive: [(&'static str, usize); 6] = [
        ("limits.max_message_size", limits.max_message_size),
        ("limits.max_frame_size", limits.max_frame_size),
        ("limits.max_queued_messages", limits.max_queued_messages),
        ("limits.max_queued_bytes", limits.max_queued_bytes),
        ("limits.max_connections", limits.max_connections),
        ("limits.max_targets", limits.max_targets),
    ];
    for (key, value) in positive {
        if value == 0 {
            return Err(ConfigError::Invalid {
                key,
                message: "must be at least 1".to_owned(),
            });
        }
    }
    if limits.max_header_size < 8 * 1024 {
        return Err(ConfigError::Invalid {
            key: "limits.max_header_size",
            message: format!("is {}: use at least 8192", limits.max_header_size),
        });
    }
    if limits.max_connections > tokio::sync::Semaphore::MAX_PERMITS {
        return Err(ConfigError::Invalid {
            key: "limits.max_connections",
            message: format!("must be at most {}", tokio::sync::Semaphore::MAX_PERMITS),
        });
    }
    if limits.pong_timeout.is_zero() && !limits.ping_interval.is_zero() {
        return Err(ConfigError::Invalid {
            key: "limits.pong_timeout",
            message:
                "must be above 0 while pings are on (set ping_interval = \"0\" to turn them off)"
                    .to_owned(),
        });
    }
    Ok(())
}
