//! Where each setting comes from: the flags and their `SWITCHBOARD_*`
//! environment variables (parsed by clap into [`Cli`]), the TOML file, and
//! the precedence between them — default < file < environment < flag, key
//! by key. The result, [`Settings`], is what was asked for, not yet checked
//! (the `validate` module checks it).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{CommandFactory as _, Parser, ValueEnum};
use switchboard::{DuplicateIds, Limits, SlowConsumer};

use crate::config::ConfigError;
use crate::config::schema::{self, AuthMode, BackendKind, FileConfig, ListenAddr, LogFormat};

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
    /// Address to listen on, HOST:PORT: an IP address, or a name bound at
    /// the first address it resolves to; port 0 picks a free port
    /// [default: 127.0.0.1:8080].
    #[arg(long, env = "SWITCHBOARD_LISTEN", value_name = "ADDR")]
    pub(crate) listen: Option<ListenAddr>,
    /// Log format [default: text].
    #[arg(long, env = "SWITCHBOARD_LOG_FORMAT", value_enum)]
    pub(crate) log_format: Option<LogFormat>,
    /// Log filter, e.g. "info" or "switchboard=debug" [default: info].
    #[arg(long, env = "SWITCHBOARD_LOG_LEVEL", value_name = "FILTER")]
    pub(crate) log_level: Option<String>,
    /// How long a stop may take, from SIGTERM (or from Ctrl-C) to exit;
    /// at least drain window + grace [default: 30s].
    #[arg(long, env = "SWITCHBOARD_SHUTDOWN_TIMEOUT", value_parser = duration, value_name = "DURATION")]
    pub(crate) shutdown_timeout: Option<Duration>,
    /// SIGTERM spreads the clients' reconnects over this long: each is
    /// told its own delay; 0 closes everyone at once [default: 20s].
    #[arg(long, env = "SWITCHBOARD_DRAIN_WINDOW", value_parser = duration, value_name = "DURATION")]
    pub(crate) drain_window: Option<Duration>,
    /// How long a switchboard.v1 client may stay after its reconnect delay
    /// before it is closed with 1012 [default: 5s].
    #[arg(long, env = "SWITCHBOARD_DRAIN_GRACE", value_parser = duration, value_name = "DURATION")]
    pub(crate) drain_grace: Option<Duration>,
    /// Write the server's process ID to this file once it listens, for
    /// `kill -HUP "$(cat PATH)"`; removed on exit [default: none].
    #[arg(long, env = "SWITCHBOARD_PID_FILE", value_name = "PATH")]
    pub(crate) pid_file: Option<PathBuf>,

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
    /// digits, - _ . : [default: HOST-PID-RANDOM, e.g. web1-4242-9f3a1c].
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
    /// How many IDs' locations a node keeps from Redis until Redis says
    /// they changed (client-side caching; about 100 B each; 0: off; not
    /// used on a Redis Cluster) [default: 100000].
    #[arg(
        long,
        env = "SWITCHBOARD_REDIS_LOCATION_CACHE",
        value_name = "ENTRIES",
        help_heading = "Cluster"
    )]
    pub(crate) redis_location_cache: Option<usize>,

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
    /// Answer 408 and close when a request body has not fully arrived this
    /// long after its headers; 0 disables [default: 10s].
    #[arg(long, env = "SWITCHBOARD_BODY_TIMEOUT", value_parser = duration, value_name = "DURATION", help_heading = "Limits")]
    pub(crate) body_timeout: Option<Duration>,
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
    // A value may start with '-': a PEM key given by mistake then reaches
    // the check that explains it, as from the environment or the file.
    #[arg(
        long,
        env = "SWITCHBOARD_AUTH_JWT_SECRET",
        value_name = "SECRET",
        hide_env_values = true,
        allow_hyphen_values = true,
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
    /// With a JWKS of several keys, refuse tokens without a kid instead of
    /// trying each key [default: true].
    #[arg(
        long,
        env = "SWITCHBOARD_AUTH_JWKS_REQUIRE_KID",
        value_name = "BOOL",
        help_heading = "Security"
    )]
    pub(crate) auth_jwks_require_kid: Option<bool>,
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
    /// Host names answered besides localhost, 127.0.0.1 and [::1],
    /// comma-separated: rt.example.com, *.example.com, or * for any. On a
    /// loopback address other names get 421 [default: loopback names only
    /// on loopback, any elsewhere].
    #[arg(
        long,
        env = "SWITCHBOARD_ALLOWED_HOSTS",
        value_name = "HOSTS",
        value_delimiter = ',',
        help_heading = "Security"
    )]
    pub(crate) allowed_hosts: Option<Vec<String>>,
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

/// Every setting, taken from the source that won; paths are absolute
/// (a relative one in the file was taken from the file's folder).
pub(crate) struct Settings {
    pub(crate) listen: ListenAddr,
    pub(crate) log_format: LogFormat,
    pub(crate) log_level: String,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) pid_file: Option<PathBuf>,
    /// The limits and `[compression]`, key by key.
    pub(crate) limits: Limits,
    pub(crate) backend: BackendKind,
    pub(crate) redis: RedisSettings,
    pub(crate) auth: AuthSettings,
    pub(crate) api: ApiSettings,
    pub(crate) allowed_origins: Option<Vec<String>>,
    pub(crate) allowed_hosts: Option<Vec<String>>,
    pub(crate) trusted_proxies: Option<Vec<String>>,
    pub(crate) tls_cert: Option<PathBuf>,
    pub(crate) tls_key: Option<PathBuf>,
    pub(crate) insecure_allow_anonymous: bool,
    pub(crate) insecure_open_api: bool,
}

/// `node_id` and `[redis]`; `None` keeps the default of
/// [`switchboard::RedisConfig`].
pub(crate) struct RedisSettings {
    pub(crate) url: Option<String>,
    pub(crate) node_id: Option<String>,
    pub(crate) key_prefix: Option<String>,
    pub(crate) presence_ttl: Option<Duration>,
    pub(crate) request_timeout: Option<Duration>,
    pub(crate) location_cache: Option<usize>,
}

/// `[auth]`; `None` keeps the library's default.
pub(crate) struct AuthSettings {
    pub(crate) mode: AuthMode,
    pub(crate) secret: Option<String>,
    pub(crate) public_key: Option<PathBuf>,
    pub(crate) jwks: Option<PathBuf>,
    pub(crate) jwks_require_kid: Option<bool>,
    pub(crate) issuer: Option<String>,
    pub(crate) audience: Option<String>,
    pub(crate) clock_skew: Option<Duration>,
    pub(crate) expiry_grace: Option<Duration>,
}

/// `[api]`; `None` keeps the library's default.
pub(crate) struct ApiSettings {
    pub(crate) keys: Vec<String>,
    pub(crate) protect_metrics: Option<bool>,
    pub(crate) protect_heartbeat: Option<bool>,
}

impl Cli {
    /// Parses the command line, with the `SWITCHBOARD_*` environment
    /// variables standing in for absent flags. A bad value that came from
    /// a variable is reported naming the variable, not only the flag the
    /// user never typed.
    pub(crate) fn from_command_line() -> Result<Self, clap::Error> {
        let args: Vec<OsString> = std::env::args_os().collect();
        Self::try_parse_from(&args).map_err(|err| name_the_variable(err, &args))
    }

    /// Reads the file and applies the environment and the flags over it
    /// (clap has already put environment values into unset flags).
    pub(crate) fn into_settings(self) -> Result<Settings, ConfigError> {
        check_env_names()?;
        // Paths in the file are relative to the file's folder; paths in
        // flags and the environment to the working directory. All become
        // absolute here, so errors and reloads name the file tried.
        let (mut file, file_dir) = match &self.config {
            Some(path) => {
                let path = absolute("config", path)?;
                let dir = path.parent().map(Path::to_owned).unwrap_or_default();
                (read_file(&path)?, dir)
            }
            None => (FileConfig::default(), PathBuf::new()),
        };
        let path = |key: &'static str, flag: Option<PathBuf>, in_file: Option<PathBuf>| match (
            flag, in_file,
        ) {
            (Some(path), _) => absolute(key, &path).map(Some),
            (None, Some(path)) => absolute(key, &file_dir.join(path)).map(Some),
            (None, None) => Ok(None),
        };
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
            body_timeout,
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
        limits.v1 = file.v1.take().unwrap_or_default();
        limits.drain = file.drain.take().unwrap_or_default();
        if let Some(window) = self.drain_window {
            limits.drain.window = window;
        }
        if let Some(grace) = self.drain_grace {
            limits.drain.grace = grace;
        }
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

        let auth = file.auth.take().unwrap_or_default();
        let api = file.api.take().unwrap_or_default();
        let tls = file.tls.take().unwrap_or_default();
        let redis = file.redis.take().unwrap_or_default();
        Ok(Settings {
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or_else(schema::default_listen),
            log_format: self
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            log_level: self
                .log_level
                .or(file.log_level)
                .unwrap_or_else(|| schema::DEFAULT_LOG_LEVEL.to_owned()),
            shutdown_timeout: self
                .shutdown_timeout
                .or(file.shutdown_timeout)
                .unwrap_or(switchboard::DEFAULT_SHUTDOWN_TIMEOUT),
            pid_file: path("pid_file", self.pid_file, file.pid_file)?,
            limits,
            backend: self.backend.or(file.backend).unwrap_or(BackendKind::Memory),
            redis: RedisSettings {
                url: self.redis_url.or(redis.url),
                node_id: self.node_id.or(file.node_id),
                key_prefix: self.redis_key_prefix.or(redis.key_prefix),
                presence_ttl: self.redis_presence_ttl.or(redis.presence_ttl),
                request_timeout: self.redis_request_timeout.or(redis.request_timeout),
                location_cache: self.redis_location_cache.or(redis.location_cache),
            },
            auth: AuthSettings {
                mode: self.auth_mode.or(auth.mode).unwrap_or(AuthMode::None),
                secret: self.auth_jwt_secret.or(auth.jwt_secret),
                public_key: path(
                    "auth.jwt_public_key",
                    self.auth_jwt_public_key,
                    auth.jwt_public_key,
                )?,
                jwks: path("auth.jwt_jwks", self.auth_jwt_jwks, auth.jwt_jwks)?,
                jwks_require_kid: self.auth_jwks_require_kid.or(auth.jwks_require_kid),
                issuer: self.auth_issuer.or(auth.issuer),
                audience: self.auth_audience.or(auth.audience),
                clock_skew: self.auth_clock_skew.or(auth.clock_skew),
                expiry_grace: self.auth_expiry_grace.or(auth.expiry_grace),
            },
            api: ApiSettings {
                keys: self.api_keys.or(api.keys).unwrap_or_default(),
                protect_metrics: self.api_protect_metrics.or(api.protect_metrics),
                protect_heartbeat: self.api_protect_heartbeat.or(api.protect_heartbeat),
            },
            allowed_origins: self.allowed_origins.or(file.allowed_origins),
            allowed_hosts: self.allowed_hosts.or(file.allowed_hosts),
            trusted_proxies: self.trusted_proxies.or(file.trusted_proxies),
            tls_cert: path("tls.cert", self.tls_cert, tls.cert)?,
            tls_key: path("tls.key", self.tls_key, tls.key)?,
            insecure_allow_anonymous: self
                .insecure_allow_anonymous
                .or(file.insecure_allow_anonymous)
                .unwrap_or(false),
            insecure_open_api: self
                .insecure_open_api
                .or(file.insecure_open_api)
                .unwrap_or(false),
        })
    }
}

/// `path` made absolute against the working directory, without touching
/// the file system (so the file need not exist yet).
fn absolute(key: &'static str, path: &Path) -> Result<PathBuf, ConfigError> {
    if path.as_os_str().is_empty() {
        return Err(ConfigError::Invalid {
            key,
            message: "is an empty path: give a file, or leave the setting out".to_owned(),
        });
    }
    std::path::absolute(path).map_err(|err| ConfigError::Invalid {
        key,
        message: format!(
            "cannot resolve {} against the working directory: {err}",
            path.display()
        ),
    })
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

/// Rewrites clap's `invalid value 'X' for '--flag <V>'` as `invalid value
/// 'X' in SWITCHBOARD_FLAG (the environment variable for --flag)` when the
/// value came from the environment: when the same arguments without the
/// environment do not fail the same way.
fn name_the_variable(err: clap::Error, args: &[OsString]) -> clap::Error {
    if !matches!(
        err.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return err;
    }
    let (Some(ContextValue::String(invalid_arg)), Some(ContextValue::String(value))) = (
        err.get(ContextKind::InvalidArg),
        err.get(ContextKind::InvalidValue),
    ) else {
        return err;
    };
    let mut command = Cli::command();
    command.build();
    let Some(arg) = command
        .get_arguments()
        .find(|arg| arg.to_string() == *invalid_arg)
    else {
        return err;
    };
    let (Some(env), Some(long)) = (arg.get_env(), arg.get_long()) else {
        return err;
    };
    let env = env.to_string_lossy().into_owned();
    let shown = if arg.is_hide_env_values_set() {
        "<hidden>".to_owned()
    } else {
        format!("'{value}'")
    };
    let flag_is_bad = Cli::command()
        .mut_args(|arg| arg.env(None))
        .try_get_matches_from(args)
        .is_err_and(|flag_err| {
            flag_err.kind() == err.kind()
                && flag_err.get(ContextKind::InvalidArg) == err.get(ContextKind::InvalidArg)
        });
    if flag_is_bad {
        // The flag's own value is bad: clap's message is right.
        return err;
    }
    let mut message =
        format!("invalid value {shown} in {env} (the environment variable for --{long})");
    if let Some(source) = std::error::Error::source(&err) {
        message.push_str(&format!(": {source}"));
    }
    if let Some(ContextValue::Strings(valid)) = err.get(ContextKind::ValidValue) {
        message.push_str(&format!(" [possible values: {}]", valid.join(", ")));
    }
    message.push_str(&format!(
        "\n\n  tip: fix or unset {env}; --{long} on the command line takes precedence over it\n"
    ));
    clap::Error::raw(err.kind(), message).with_cmd(&command)
}

/// A misspelt `SWITCHBOARD_*` variable would otherwise be ignored silently.
fn check_env_names() -> Result<(), ConfigError> {
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
