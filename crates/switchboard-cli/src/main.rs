//! The `switchboard` server.
//!
//! Exit codes: 0 after a clean shutdown, 2 for a configuration or usage
//! error, 3 when the listen address cannot be bound, 1 for anything else.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use switchboard::auth::jwt::JwtAuthenticator;
use switchboard::tls::Tls;
use switchboard::{Hub, ServeOptions};

mod config;
mod listener;
mod logging;
mod pid_file;

use config::{BackendConfig, Cli, Config, ConfigError};
use listener::BindError;
use pid_file::{PidFile, PidFileError};
use switchboard::redis::RedisBackend;

/// Exit code for configuration and usage errors (clap uses it too).
const EXIT_CONFIG: u8 = 2;
/// Exit code when the listen address cannot be bound.
const EXIT_BIND: u8 = 3;

fn main() -> ExitCode {
    let cli = match Cli::from_command_line() {
        Ok(cli) => cli,
        Err(err) => {
            // Help and --version go to stdout with exit code 0.
            let _ = err.print();
            return ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(EXIT_CONFIG));
        }
    };
    let config = match cli.resolve() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {:#}", anyhow::Error::new(err));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Err(err) = logging::init(config.log_format, &config.log_level) {
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
            // Once, in the log format asked for; on stderr as plain text
            // only when the log filter hides errors.
            if tracing::enabled!(tracing::Level::ERROR) {
                tracing::error!("{err:#}");
            } else {
                eprintln!("error: {err:#}");
            }
            if err.downcast_ref::<BindError>().is_some() {
                ExitCode::from(EXIT_BIND)
            } else if err.downcast_ref::<ConfigError>().is_some()
                || err.downcast_ref::<PidFileError>().is_some()
            {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    if let Some(path) = &config.pid_file {
        pid_file::check(path)?;
    }
    let listener = listener::bind(&config.listen).await?;
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
                presence_ttl = %switchboard::duration::format(redis.presence_ttl),
                "backend: redis (connecting in the background)"
            );
            let backend =
                RedisBackend::start_with_limits(redis, &config.limits).map_err(|err| {
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
        auth = if security.authenticator.is_some() {
            "jwt"
        } else {
            "none"
        },
        api_keys = security.api_keys.len(),
        origins = logging::json(&config.allowed_origins),
        trusted_proxies = logging::json(&config.trusted_proxies),
        tls = config.tls.is_some(),
        "security"
    );
    spawn_reload_on_sighup(config.tls.clone(), config.jwt.clone());
    // Written once SIGHUP reloads rather than kills, so whoever reads the
    // file may signal at once; removed when `run` returns, however it ends.
    let _pid_file = config.pid_file.as_deref().map(PidFile::write).transpose()?;
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let signals = StopSignals::install();
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
    let signal = stop_requested(signals, hub.clone());
    let shutdown = async {
        tokio::select! {
            () = signal => {}
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

/// The stop signals, with both handlers installed when this is built.
///
/// Why installed up front rather than in an `async fn`: its body would
/// register the handlers only when first polled, inside `serve`, after the
/// server has logged that it listens. A SIGTERM sent in between — a
/// supervisor stopping a server that just started — would take the default
/// action and kill the process without a graceful shutdown (seen under load
/// in `runs_with_no_config_and_heartbeat_answers_200`).
struct StopSignals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
}

/// Which stop signal arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGTERM: what supervisors send (systemd, Docker, Kubernetes).
    Terminate,
    /// SIGINT: Ctrl-C, a person at a terminal.
    Interrupt,
}

impl StopSignals {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let install = |kind: SignalKind, name: &str| {
                signal(kind)
                    .inspect_err(|err| tracing::warn!(%err, "cannot listen for {name}"))
                    .ok()
            };
            Self {
                term: install(SignalKind::terminate(), "SIGTERM"),
                interrupt: install(SignalKind::interrupt(), "SIGINT"),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// The next stop signal.
    async fn next(&mut self) -> Stop {
        #[cfg(unix)]
        {
            async fn wait(signal: &mut Option<tokio::signal::unix::Signal>) {
                match signal {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                () = wait(&mut self.interrupt) => Stop::Interrupt,
                () = wait(&mut self.term) => Stop::Terminate,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Stop::Interrupt
        }
    }
}

/// Resolves when the server should stop serving:
///
/// - SIGTERM starts a drain ([`Hub::drain`]: new upgrades get 503, clients
///   are told to reconnect elsewhere, spread over `drain.window`), and this
///   resolves when the drain has finished;
/// - `POST /api/drain` does the same without a signal;
/// - Ctrl-C (SIGINT) outside a drain stops at once: every connection gets
///   1001 (a person at a terminal does not want to wait for a drain);
/// - a second SIGTERM or Ctrl-C during a drain stops at once the same way.
async fn stop_requested(mut signals: StopSignals, hub: Hub) {
    loop {
        tokio::select! {
            stop = signals.next() => {
                match (stop, hub.is_draining()) {
                    (Stop::Terminate, false) => {
                        tracing::info!("received SIGTERM: draining (a second SIGTERM or Ctrl-C closes every connection at once)");
                        hub.drain();
                    }
                    (Stop::Interrupt, false) => {
                        tracing::info!("received Ctrl-C");
                        return;
                    }
                    (stop, true) => {
                        let name = if stop == Stop::Terminate { "SIGTERM" } else { "Ctrl-C" };
                        tracing::info!(
                            connections = hub.live_connections(),
                            "received {name} during the drain: closing every connection now"
                        );
                        return;
                    }
                }
            }
            () = hub.drain_finished() => return,
        }
    }
}
