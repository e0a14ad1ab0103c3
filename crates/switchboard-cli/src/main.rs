//! The `switchboard` server.
//!
//! Exit codes: 0 after a clean shutdown, 2 for a configuration or usage
//! error, 3 when the listen address cannot be bound, 1 for anything else.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use switchboard::Hub;
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
    let (hub, redis) = match config.backend {
        BackendConfig::Memory => (Hub::new(config.limits.clone()), None),
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
            let hub = Hub::with_backend(config.limits.clone(), backend.clone());
            (hub, Some(backend))
        }
    };
    let app = switchboard::app(hub.clone());
    tracing::info!("listening on http://{addr}");
    let served = switchboard::serve_with(
        listener,
        app,
        hub,
        shutdown_signal(),
        config.shutdown_timeout,
    )
    .await;
    // Leave the cluster whatever happened: the other nodes then report this
    // node's IDs offline at once instead of after the presence TTL.
    if let Some(backend) = redis {
        backend.shutdown().await;
    }
    served.context("server failed")?;
    tracing::info!("shut down cleanly");
    Ok(())
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
