//! Checks the merged [`Settings`] and turns them into the [`Config`] the
//! server runs with: values in range, settings that need each other, key
//! files and certificates loaded (so a bad one stops the server before it
//! binds), and the safe defaults — no anonymous clients and no open API on
//! a non-loopback address unless asked for.

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::sync::Arc;

use switchboard::auth::jwt::{JwtAuthenticator, JwtConfig, JwtKey};
use switchboard::auth::{AllowedHosts, AllowedOrigins, ApiKeys, TrustedProxies};
use switchboard::redis::{RedisConfig, RedisConfigError};
use switchboard::tls::{Tls, TlsError};
use switchboard::{Limits, Security};

use crate::config::schema::{AuthMode, BackendKind, ListenAddr};
use crate::config::sources::{AuthSettings, RedisSettings, Settings};
use crate::config::{BackendConfig, Config, ConfigError, Listen};

/// Checks `settings`; the first problem found stops the server.
pub(crate) fn check(settings: Settings) -> Result<Config, ConfigError> {
    let backend = backend_config(settings.backend, &settings.redis)?;
    settings
        .limits
        .compression
        .validate()
        .map_err(|message| ConfigError::Invalid {
            key: "compression",
            message,
        })?;
    check_limits(&settings.limits)?;
    check_drain(&settings)?;
    let listen = resolve_listen(&settings.listen)?;
    let secured = security_config(&settings, &listen)?;
    Ok(Config {
        listen,
        log_format: settings.log_format,
        log_level: settings.log_level,
        shutdown_timeout: settings.shutdown_timeout,
        pid_file: settings.pid_file,
        limits: settings.limits,
        backend,
        security: secured.security,
        allowed_origins: settings.allowed_origins,
        trusted_proxies: settings.trusted_proxies.unwrap_or_default(),
        jwt: secured.jwt,
        tls: secured.tls,
        warnings: secured.warnings,
    })
}

/// The security half of [`Config`].
struct Secured {
    security: Security,
    jwt: Option<Arc<JwtAuthenticator>>,
    tls: Option<Tls>,
    warnings: Vec<String>,
}

fn invalid(key: &'static str, message: String) -> ConfigError {
    ConfigError::Invalid { key, message }
}

/// `[auth]`, `[api]`, `[tls]`, origins and proxies, checked and loaded,
/// and the safe defaults.
fn security_config(settings: &Settings, listen: &Listen) -> Result<Secured, ConfigError> {
    let mut security = Security::default();
    let auth = &settings.auth;
    if let Some(grace) = auth.expiry_grace {
        security.expiry_grace = grace;
    }
    let jwt = jwt_authenticator(auth)?;
    if let Some(jwt) = &jwt {
        security.authenticator = Some(jwt.clone());
    }

    let api = &settings.api;
    security.api_keys =
        ApiKeys::new(&api.keys).map_err(|err| invalid("api.keys", err.to_string()))?;
    if let Some(protect) = api.protect_metrics {
        security.protect_metrics = protect;
    }
    if let Some(protect) = api.protect_heartbeat {
        security.protect_heartbeat = protect;
    }
    if let Some(hosts) = &settings.allowed_hosts {
        security.allowed_hosts = Some(
            AllowedHosts::new(hosts).map_err(|err| invalid("allowed_hosts", err.to_string()))?,
        );
    }
    if let Some(origins) = &settings.allowed_origins {
        security.allowed_origins = Some(
            AllowedOrigins::new(origins)
                .map_err(|err| invalid("allowed_origins", err.to_string()))?,
        );
    }
    if let Some(proxies) = &settings.trusted_proxies {
        security.trusted_proxies = TrustedProxies::new(proxies)
            .map_err(|err| invalid("trusted_proxies", err.to_string()))?;
    }
    let tls = tls(settings)?;
    let warnings = safe_defaults(settings, listen, &security)?;
    Ok(Secured {
        security,
        jwt,
        tls,
        warnings,
    })
}

/// The JWT authenticator `[auth]` asks for, its key read now; `None` for
/// `auth.mode = "none"`, where no key may be set.
fn jwt_authenticator(auth: &AuthSettings) -> Result<Option<Arc<JwtAuthenticator>>, ConfigError> {
    let given: Vec<&str> = [
        (auth.secret.is_some(), "auth.jwt_secret"),
        (auth.public_key.is_some(), "auth.jwt_public_key"),
        (auth.jwks.is_some(), "auth.jwt_jwks"),
    ]
    .into_iter()
    .filter_map(|(set, name)| set.then_some(name))
    .collect();
    match auth.mode {
        AuthMode::None => {
            let stray = given
                .iter()
                .copied()
                .chain(auth.issuer.is_some().then_some("auth.issuer"))
                .chain(auth.audience.is_some().then_some("auth.audience"))
                .next();
            match stray {
                Some(stray) => Err(invalid(
                    "auth.mode",
                    format!(
                        "is \"none\" but {stray} is set: set auth.mode = \"jwt\" (--auth-mode jwt) to authenticate clients, or remove {stray}"
                    ),
                )),
                None => Ok(None),
            }
        }
        AuthMode::Jwt => {
            let (key, name) = match (&auth.secret, &auth.public_key, &auth.jwks) {
                (Some(secret), None, None) => (
                    JwtKey::Secret(secret.clone().into_bytes()),
                    "auth.jwt_secret",
                ),
                (None, Some(path), None) => {
                    (JwtKey::PublicKeyFile(path.clone()), "auth.jwt_public_key")
                }
                (None, None, Some(path)) => (JwtKey::JwksFile(path.clone()), "auth.jwt_jwks"),
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
            config.issuer = auth.issuer.clone();
            config.audience = auth.audience.clone();
            if let Some(require) = auth.jwks_require_kid {
                config.jwks_require_kid = require;
            }
            if let Some(skew) = auth.clock_skew {
                config.clock_skew = skew;
            }
            let authenticator =
                JwtAuthenticator::new(config).map_err(|err| invalid(name, err.to_string()))?;
            Ok(Some(Arc::new(authenticator)))
        }
    }
}

/// `[tls]`: both files or neither, read and checked to belong together.
fn tls(settings: &Settings) -> Result<Option<Tls>, ConfigError> {
    match (&settings.tls_cert, &settings.tls_key) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(invalid(
            "tls.key",
            "is required with tls.cert: the certificate's private key, in PEM".to_owned(),
        )),
        (None, Some(_)) => Err(invalid(
            "tls.cert",
            "is required with tls.key: the certificate chain, in PEM".to_owned(),
        )),
        (Some(cert), Some(key)) => {
            let tls = Tls::from_pem_files(cert.clone(), key.clone()).map_err(|err| {
                let name = match &err {
                    TlsError::NoKey { .. } => "tls.key",
                    TlsError::Read { path, .. } if path == key => "tls.key",
                    _ => "tls.cert",
                };
                invalid(name, err.to_string())
            })?;
            Ok(Some(tls))
        }
    }
}

/// No anonymous clients and no open API on a non-loopback address unless
/// asked for; what is allowed that way is returned as warnings.
///
/// A name counts as loopback only when every address it resolves to is.
fn safe_defaults(
    settings: &Settings,
    listen: &Listen,
    security: &Security,
) -> Result<Vec<String>, ConfigError> {
    let mut warnings = Vec::new();
    let loopback = listen.is_loopback();
    if settings.auth.mode == AuthMode::None && !loopback {
        if !settings.insecure_allow_anonymous {
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
        if !loopback && !settings.insecure_open_api {
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
    Ok(warnings)
}

/// `listen`: an IP address as it is, a name resolved now (by the system's
/// resolver: /etc/hosts, then DNS), so the safe defaults judge the
/// addresses the server will bind.
fn resolve_listen(written: &ListenAddr) -> Result<Listen, ConfigError> {
    let addrs: Vec<SocketAddr> = match written.ip {
        Some(addr) => vec![addr],
        None => {
            let mut addrs = Vec::new();
            let resolved = (written.host.as_str(), written.port)
                .to_socket_addrs()
                .map_err(|err| {
                    invalid(
                        "listen",
                        format!(
                            "cannot resolve the host name in {written}: {err}. Use an IP address (127.0.0.1:{port}) or a name this machine resolves",
                            port = written.port
                        ),
                    )
                })?;
            for addr in resolved {
                if !addrs.contains(&addr) {
                    addrs.push(addr);
                }
            }
            addrs
        }
    };
    if addrs.is_empty() {
        return Err(invalid(
            "listen",
            format!(
                "{written} resolves to no address: use an IP address, e.g. 127.0.0.1:{}",
                written.port
            ),
        ));
    }
    Ok(Listen {
        written: written.clone(),
        addrs,
    })
}

/// `backend` and, for Redis, its settings over the defaults of
/// [`RedisConfig`].
fn backend_config(kind: BackendKind, redis: &RedisSettings) -> Result<BackendConfig, ConfigError> {
    if kind == BackendKind::Memory {
        return Ok(BackendConfig::Memory);
    }
    let url = redis.url.clone().ok_or_else(|| ConfigError::Invalid {
        key: "redis.url",
        message: "is required with backend = \"redis\" (--redis-url, SWITCHBOARD_REDIS_URL or url in [redis])".to_owned(),
    })?;
    let mut config = RedisConfig::new(url);
    if let Some(node_id) = &redis.node_id {
        config.node_id = node_id.clone();
    }
    if let Some(prefix) = &redis.key_prefix {
        config.key_prefix = prefix.clone();
    }
    if let Some(ttl) = redis.presence_ttl {
        config.presence_ttl = ttl;
    }
    if let Some(timeout) = redis.request_timeout {
        config.request_timeout = timeout;
    }
    if let Some(entries) = redis.location_cache {
        config.location_cache_entries = entries;
    }
    config.validate().map_err(|err| {
        let key = match err {
            RedisConfigError::Url { .. } => "redis.url",
            RedisConfigError::NodeId(_) => "node_id",
            RedisConfigError::KeyPrefix(_) | RedisConfigError::KeyPrefixHashTag(_) => {
                "redis.key_prefix"
            }
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

/// The limits the library takes on trust.
fn check_limits(limits: &Limits) -> Result<(), ConfigError> {
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

/// A drain must end before the shutdown timeout, counted from the same
/// SIGTERM, runs out: otherwise its last clients are dropped without their
/// close (and a supervisor's SIGKILL, sent after its own grace period,
/// cuts the drain short the same way).
fn check_drain(settings: &Settings) -> Result<(), ConfigError> {
    let drain = settings.limits.drain;
    if drain.total() <= settings.shutdown_timeout {
        return Ok(());
    }
    let format = switchboard::duration::format;
    Err(ConfigError::Invalid {
        key: "drain",
        message: format!(
            "window ({}) + grace ({}) = {} is longer than shutdown_timeout ({}): the last clients would be dropped before their close. Raise shutdown_timeout to at least {} (--shutdown-timeout; and your supervisor's stop timeout, e.g. Kubernetes' terminationGracePeriodSeconds), or shorten drain.window / drain.grace (--drain-window, --drain-grace)",
            format(drain.window),
            format(drain.grace),
            format(drain.total()),
            format(settings.shutdown_timeout),
            format(drain.total()),
        ),
    })
}
