//! Serving a router: the accept loop, the connection cap, graceful shutdown,
//! and JSON for every error axum would answer with an empty body.
//!
//! The flow, top-down: [`serve`] accepts TCP connections while it holds a
//! permit of the connection cap, hands each to hyper's HTTP/1.1 server with
//! upgrades on, and when `shutdown` resolves stops accepting, closes every
//! WebSocket with 1001 after its queued frames, and waits (bounded) for the
//! connections to finish.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tower::ServiceExt as _;

use super::deadline::{BodyDeadline, limit_body};
use super::host::{self, HostPolicy};
use super::json_errors::json_errors;
use super::upgrade::ConnSlot;
use crate::hub::Hub;
use crate::hub::{CapPermit, refusals};
use crate::metrics::ErrorKind;
use crate::protocol::close::{CloseCode, CloseFrame};

/// How long [`serve`] waits for connections to finish after shutdown
/// begins (or after a drain began, see [`ServeOptions::shutdown_timeout`]),
/// by default: 30 s, Kubernetes' default termination grace period, which
/// holds the default drain (`window` 20 s + `grace` 5 s) and the last
/// close handshakes (`close_timeout` 5 s).
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// The least time shutdown gives the connections still open to be sent
/// their 1001 when the shutdown timeout counted from a drain's start has
/// already passed (a second signal at the end of a drain): writing a close
/// frame to a socket that takes it is microseconds; half a second covers a
/// loaded node.
const LAST_CLOSES: Duration = Duration::from_millis(500);

/// Serves `router` on `listener` until `shutdown` resolves, then shuts down
/// gracefully within [`DEFAULT_SHUTDOWN_TIMEOUT`]. See [`serve_with`].
pub async fn serve(
    listener: TcpListener,
    router: Router,
    hub: Hub,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    serve_with(listener, router, hub, shutdown, DEFAULT_SHUTDOWN_TIMEOUT).await
}

/// Serves `router` on `listener` until `shutdown` resolves.
///
/// Then: stop accepting; ask in-flight HTTP requests to finish; close every
/// WebSocket with 1001 "server shutting down" after the frames already
/// queued to it, including those whose upgrade completes from now on
/// ([`Hub::begin_shutdown`]); wait up to `shutdown_timeout` for all of
/// that; return.
pub async fn serve_with(
    listener: TcpListener,
    router: Router,
    hub: Hub,
    shutdown: impl Future<Output = ()> + Send,
    shutdown_timeout: Duration,
) -> io::Result<()> {
    let options = ServeOptions {
        shutdown_timeout,
        ..ServeOptions::default()
    };
    serve_with_options(listener, router, hub, shutdown, options).await
}

/// How [`serve_with_options`] serves. Build it with struct update syntax,
/// `ServeOptions { tls: Some(tls), ..ServeOptions::default() }`, so that
/// options added later keep their defaults.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// How long shutdown waits for connections to finish. Default
    /// [`DEFAULT_SHUTDOWN_TIMEOUT`]. When the hub drained first
    /// ([`Hub::drain`]), counted from the drain's start, so that the whole
    /// stop fits the time a supervisor gives between SIGTERM and SIGKILL.
    pub shutdown_timeout: Duration,
    /// Serve HTTPS and WSS instead of HTTP and WS, on the same port.
    /// The TLS handshake must finish within `limits.handshake_timeout`.
    #[cfg(feature = "tls")]
    pub tls: Option<super::tls::Tls>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

/// [`serve_with`], with TLS and the other [`ServeOptions`].
pub async fn serve_with_options(
    listener: TcpListener,
    router: Router,
    hub: Hub,
    shutdown: impl Future<Output = ()> + Send,
    options: ServeOptions,
) -> io::Result<()> {
    let limits = hub.limits().clone();
    // Why a semaphore: each permit is one open TCP connection, HTTP or
    // WebSocket; when none is left, the next client is told 503 at once
    // instead of queueing in the kernel and timing out.
    let cap = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_http, http_stopped) = watch::channel(false);
    let router = json_errors(router);
    let hosts = Arc::new(HostPolicy::new(
        listener
            .local_addr()
            .map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |addr| addr.ip()),
        hub.security().allowed_hosts.clone(),
    ));
    #[cfg(feature = "tls")]
    let tls = options.tls.as_ref().map(super::tls::Tls::acceptor);
    tokio::pin!(shutdown);

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // Out of file descriptors or a transient network error:
                    // back off a little instead of spinning.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let Some(permit) = CapPermit::try_acquire(&cap) else {
            hub.refusal_log().record(
                refusals::refusal(
                    None,
                    503,
                    "over_capacity",
                    Some(peer.ip()),
                    refusals::request_id(None),
                ),
                "the server is at its connection limit (limits.max_connections)",
            );
            #[cfg(feature = "tls")]
            if let Some(tls) = &tls {
                let tls = tls.clone();
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(Duration::from_secs(2), tls.accept(stream));
                    if let Ok(Ok(stream)) = handshake.await {
                        refuse_over_capacity(stream).await;
                    }
                });
                continue;
            }
            tokio::spawn(refuse_over_capacity(stream));
            continue;
        };
        let slot = ConnSlot::new(permit);
        let router = router.clone();
        let body_timeout = limits.body_timeout;
        let hosts = Arc::clone(&hosts);
        let conn_hub = hub.clone();
        let service = hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
            request.extensions_mut().insert(slot.clone());
            request.extensions_mut().insert(ConnectInfo(peer));
            let checked = host::authority(request.version(), request.uri(), request.headers())
                .inspect_err(|_| conn_hub.metrics().error(ErrorKind::BadRequest))
                .and_then(|authority| {
                    hosts
                        .check(authority.as_ref())
                        .inspect_err(|_| conn_hub.metrics().error(ErrorKind::Forbidden))
                });
            let (request, deadline) = limit_body(request, body_timeout);
            let response = checked.map(|_| router.clone().oneshot(request));
            async move {
                let response = match response {
                    Ok(response) => response.await,
                    Err(refusal) => return Ok(host::refuse(refusal)),
                };
                match deadline.as_ref().and_then(BodyDeadline::response) {
                    Some(timed_out) => Ok(timed_out),
                    None => response,
                }
            }
        });
        let stopping = http_stopped.clone();
        let handshake_timeout = limits.handshake_timeout;
        // hyper refuses a head over its read buffer with 431; it will not
        // go below 8 KiB.
        let max_header_size = limits.max_header_size.max(8 * 1024);
        #[cfg(feature = "tls")]
        if let Some(tls) = &tls {
            let tls = tls.clone();
            tokio::spawn(async move {
                // The handshake counts against the same deadline as the
                // request head: a client that stalls in either is dropped.
                let deadline = tokio::time::Instant::now() + handshake_timeout;
                match tokio::time::timeout_at(deadline, first_byte(&stream)).await {
                    Ok(Ok(Some(byte))) if byte.is_ascii_uppercase() => {
                        tls_required(stream, deadline).await;
                        return;
                    }
                    // A TLS record (0x16 for a handshake) or anything else:
                    // rustls decides.
                    Ok(Ok(Some(_))) => {}
                    Ok(Ok(None)) | Ok(Err(_)) => return,
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                }
                match tokio::time::timeout_at(deadline, tls.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        serve_http(
                            stream,
                            service,
                            stopping,
                            handshake_timeout,
                            max_header_size,
                            peer,
                        )
                        .await;
                    }
                    Ok(Err(err)) => tracing::debug!(%err, %peer, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
            continue;
        }
        tokio::spawn(serve_http(
            stream,
            service,
            stopping,
            handshake_timeout,
            max_header_size,
            peer,
        ));
    }

    drop(listener);
    drop(http_stopped);
    tracing::info!(
        connections = hub.live_connections(),
        "shutting down: closing connections with 1001"
    );
    let _ = stop_http.send(true);
    // Also closes the upgrades still under way (see `Hub::begin_shutdown`).
    hub.begin_shutdown(CloseFrame::new(
        CloseCode::GOING_AWAY,
        "server shutting down",
    ));
    let all_closed = async {
        hub.drained().await;
        stop_http.closed().await;
    };
    let now = tokio::time::Instant::now();
    let deadline = match hub.drain_started_at() {
        Some(started) => (started + options.shutdown_timeout)
            .max(now + LAST_CLOSES.min(options.shutdown_timeout)),
        None => now + options.shutdown_timeout,
    };
    if tokio::time::timeout_at(deadline, all_closed).await.is_err() {
        tracing::warn!(
            connections = hub.live_connections(),
            "shutdown timeout reached; dropping the remaining connections"
        );
    }
    Ok(())
}

/// One HTTP/1.1 connection with upgrades, until it ends or shutdown asks it
/// to finish its in-flight request.
async fn serve_http<IO, S>(
    io: IO,
    service: S,
    mut stopping: watch::Receiver<bool>,
    handshake_timeout: Duration,
    max_header_size: usize,
    peer: SocketAddr,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<http::Request<Incoming>, Response = Response, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(handshake_timeout)
        .max_buf_size(max_header_size)
        // One buffer and `send(2)` rather than `writev(2)` for the head and
        // body: on a socket `writev` pays for the VFS layer on top
        // (docs/benchmarks.md, "Where the server's CPU goes"), and most
        // responses here are small (a 101, a JSON reply). The price: a
        // large body (a long `/api/connections`, a user's own route) is
        // copied once into hyper's write buffer.
        .writev(false)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let stop = async {
        // Drop the `Ref` guard at once: it must not live across an await.
        let _ = stopping.wait_for(|stop| *stop).await.map(|_| ());
    };
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = stop => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(err) = result {
        tracing::debug!(%err, %peer, "http connection ended with an error");
    }
}

/// The first byte the client sent, left in the socket; `None` when it
/// closed without sending any.
#[cfg(feature = "tls")]
async fn first_byte(stream: &tokio::net::TcpStream) -> io::Result<Option<u8>> {
    let mut byte = [0u8; 1];
    let n = stream.peek(&mut byte).await?;
    Ok((n == 1).then_some(byte[0]))
}

/// Answers plain HTTP sent to the TLS port with a readable 400
/// `tls_required`, then closes.
///
/// Why: a TLS server answers a plain request with a TLS alert, bytes curl
/// shows as "HTTP/0.9 when not allowed" and browsers as an empty reply —
/// nothing that says "use https://". A TLS connection starts with a
/// handshake record (byte 0x16); an HTTP request with a method in capital
/// letters, so one byte tells them apart. The request head is read first
/// (bounded) and the socket drained after, so closing with unread bytes
/// does not turn into a reset that loses the answer.
#[cfg(feature = "tls")]
async fn tls_required(mut stream: tokio::net::TcpStream, deadline: tokio::time::Instant) {
    use tokio::io::AsyncReadExt as _;
    const HEAD_MAX: usize = 16 * 1024;
    let error = crate::http_error::HttpError::new(
        http::StatusCode::BAD_REQUEST,
        "tls_required",
        "this port speaks HTTPS: use https:// or wss://",
    );
    let body = error.body().to_string();
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    let read_head = async {
        while head.len() < HEAD_MAX
            && !head.windows(4).any(|w| w == b"\r\n\r\n")
            && !head.windows(2).any(|w| w == b"\n\n")
        {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout_at(deadline, read_head).await;
    let write = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    };
    if tokio::time::timeout(Duration::from_secs(2), write)
        .await
        .is_ok_and(|written| written.is_ok())
    {
        // Until the client closes, a little more at most.
        let drain = async {
            let mut left = 64 * 1024usize;
            while left > 0 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
    }
}

/// Answers a connection over the cap with 503 and closes it.
async fn refuse_over_capacity<IO: AsyncWrite + Unpin>(mut stream: IO) {
    const BODY: &str = r#"{"error":{"code":"over_capacity","message":"the server is at its connection limit (limits.max_connections); retry later"}}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let write = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), write).await;
}
