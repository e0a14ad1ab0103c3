//! The `switchboard` server.
//!
//! Exit codes: 0 after a clean shutdown, 2 for a configuration or usage
//! error, 3 when the listen address cannot be bound, 1 for anything else.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser as _;
use switchboard::auth::jwt::JwtAuthenticator;
use switchboard::tls::Tls;
use switchboard::{Hub, ServeOptions};
use tokio::net::TcpListener;

mod config;

use config::{BackendConfig, Cli, Config, ConfigError, LogFormat};
use switchboard::redis::RedisBackend;

/// Exit code for configuration and usage errors (clap uses it too).
const EXIT_CONFIG: u8 = 2;
/// Exit code when the listen address cannot be bound.
const EXIT_BIND: u8 = 3;

/// Marks a bind failure so `main` can pick its exit code.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}")]
struct BindError {
    addr: std::net::SocketAddr,
    #[source]
    source: std::io::Error,
}

fn main() -> ExitCode {
    let config = match Cli::parse().resolve() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {:#}", anyhow::Error::new(err));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Err(err) = init_logging(&config) {
        eprintln!("error: {err:#}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("error: {err:#}");
            if err.downcast_ref::<BindError>().is_some() {
                ExitCode::from(EXIT_BIND)
            } else if err.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| BindError {
            addr: config.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let builder = Hub::builder(config.limits.clone()).security(config.security.clone());
    let (hub, redis) = match config.backend {
        BackendConfig::Memory => (builder.build(), None),
        BackendConfig::Redis(redis) => {
            tracing::info!(
                node = %redis.node_id,
                key_prefix = %redis.key_prefix,
                presence_ttl = ?redis.presence_ttl,
                "backend: redis (connecting in the background)"
            );
            let backend =
                RedisBackend::start(redis, config.limits.duplicate_ids).map_err(|err| {
                    anyhow::Error::new(ConfigError::Invalid {
                        key: "redis",
                        message: err.to_string(),
                    })
                })?;
            let hub = builder.backend(backend.clone()).build();
            (hub, Some(backend))
        }
    };
    let app = switchboard::app(hub.clone());
    let security = &config.security;
    tracing::info!(
        auth = if security.authenticator.is_some() { "jwt" } else { "none" },
        api_keys = security.api_keys.len(),
        origins = ?security.allowed_origins,
        trusted_proxies = ?security.trusted_proxies,
        tls = config.tls.is_some(),
        "security"
    );
    spawn_reload_on_sighup(config.tls.clone(), config.jwt.clone());
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!("listening on {scheme}://{addr}");
    let options = ServeOptions {
        shutdown_timeout: config.shutdown_timeout,
        tls: config.tls.clone(),
    };
    // A Redis backend that stops for good (another running node has this
    // node ID) shuts the server down like a signal, and the exit code is 2.
    let backend_failed = {
        let redis = redis.clone();
        async move {
            match redis {
                Some(backend) => drop(backend.failed().await),
                None => std::future::pending().await,
            }
        }
    };
    let shutdown = async {
        tokio::select! {
            () = shutdown_signal() => {}
            () = backend_failed => tracing::info!("shutting down: the redis backend stopped"),
        }
    };
    let served = switchboard::serve_with_options(listener, app, hub, shutdown, options).await;
    // Leave the cluster whatever happened: the other nodes then report this
    // node's IDs offline at once instead of after the presence TTL.
    if let Some(backend) = redis {
        backend.shutdown().await;
        if let Some(failure) = backend.failure() {
            return Err(ConfigError::Invalid {
                key: "node_id",
                message: format!(
                    "{failure}; set a unique --node-id (node_id in the config file, \
                     SWITCHBOARD_NODE_ID), or leave it unset: the default is unique"
                ),
            }
            .into());
        }
    }
    served.context("server failed")?;
    tracing::info!("shut down cleanly");
    Ok(())
}

/// On SIGHUP, re-reads the TLS certificate and key and the JWT key or JWKS
/// files: new connections use the new ones, open connections are not
/// touched, and a file that cannot be used leaves the current one in place.
///
/// The handler is installed before this returns, so a SIGHUP sent once the
/// server says it is listening never takes the default action (exit).
fn spawn_reload_on_sighup(tls: Option<Tls>, jwt: Option<Arc<JwtAuthenticator>>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(hangups) => hangups,
            Err(err) => {
                tracing::warn!(%err, "cannot listen for SIGHUP; certificates and keys will not be reloaded");
                return;
            }
        };
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                tracing::info!("received SIGHUP: reloading the TLS certificate and JWT keys");
                if let Some(tls) = &tls {
                    match tls.reload() {
                        Ok(()) => tracing::info!(
                            cert = %tls.cert_path().display(),
                            "reloaded the TLS certificate"
                        ),
                        Err(err) => {
                            tracing::error!(%err, "TLS reload failed; keeping the current certificate")
                        }
                    }
                }
                if let Some(jwt) = &jwt {
                    match jwt.reload() {
                        Ok(keys) => tracing::info!(keys, "reloaded the JWT keys"),
                        Err(err) => {
                            tracing::error!(%err, "JWT key reload failed; keeping the current keys")
                        }
                    }
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (tls, jwt);
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::warn!(%err, "cannot listen for SIGTERM; only Ctrl-C stops the server");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("received Ctrl-C"),
        () = term => tracing::info!("received SIGTERM"),
    }
}

fn init_logging(config: &Config) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(&config.log_level)
        .with_context(|| format!("invalid log level {:?}", config.log_level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = match config.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|err| anyhow::anyhow!("cannot set up logging: {err}"))
}
