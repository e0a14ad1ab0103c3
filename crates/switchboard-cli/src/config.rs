//! The server's configuration: defaults, then a TOML file, then
//! `SWITCHBOARD_*` environment variables, then flags — each later source
//! overriding the earlier ones, key by key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Deserialize;
use switchboard::redis::{RedisConfig, RedisConfigError};
use switchboard::{Compression, DuplicateIds, Limits, SlowConsumer};

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
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let backend = self.backend_config(&file)?;
        let mut limits = file.limits.unwrap_or_default();
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
            duplicate_ids,
            max_message_rate,
            message_burst,
            slow_consumer,
            max_header_size
        );
        limits.compression = file.compression.unwrap_or_default();
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
        Ok(Config {
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080))),
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
