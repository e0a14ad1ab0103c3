//! Mounting a [`Handler`] on an axum route.
//!
//! ```no_run
//! use axum::{Router, routing::get};
//! use switchboard::{Hub, Limits, handlers::Echo, ws};
//!
//! # async fn run() -> std::io::Result<()> {
//! let hub = Hub::new(Limits::default());
//! let app = Router::new()
//!     .route("/echo", ws(hub.clone(), Echo))
//!     .route("/hello", get(|| async { "an ordinary route" }));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! switchboard::serve(listener, app, hub, std::future::pending()).await
//! # }
//! ```

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any};
use bytes::Bytes;
use futures_util::FutureExt as _;
use http::request::Parts;
use http::{StatusCode, header};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::TcpStream;

use crate::auth::{ClientIp, Identity, IpGuard, negotiate_subprotocol};
use crate::handler::{Conn, Handler, Subprotocol, session};
use crate::http_error::HttpError;
use crate::hub::refusals::{self, request_id};
use crate::hub::{Admission, CapPermit, Hub};
use crate::metrics::ErrorKind;
use crate::protocol::close::{CloseCode, CloseFrame};
use crate::protocol::deflate::{Agreed, negotiate};
use crate::protocol::handshake::accept_key;

/// A route that upgrades requests to WebSocket connections driven by
/// `handler`. Any method is routed here so that every wrong request gets a
/// JSON error from the handshake check rather than an empty 405.
pub fn ws<H, S>(hub: Hub, handler: H) -> MethodRouter<S>
where
    H: Handler,
    S: Clone + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    any(move |request: Request| upgrade(request, Arc::clone(&handler), hub.clone()))
}

/// The connection-cap permit of the TCP connection a request came on, put
/// in the request's extensions by [`serve`](crate::serve). An upgraded
/// connection takes it, so the cap counts WebSocket connections for as long
/// as they live, not only their HTTP phase.
#[derive(Clone)]
pub(crate) struct ConnSlot(Arc<Mutex<Option<CapPermit>>>);

impl ConnSlot {
    pub(crate) fn new(permit: CapPermit) -> Self {
        Self(Arc::new(Mutex::new(Some(permit))))
    }

    fn take(&self) -> Option<CapPermit> {
        self.0.lock().take()
    }
}

async fn upgrade<H: Handler>(request: Request, handler: Arc<H>, hub: Hub) -> Response {
    let (mut parts, _body) = request.into_parts();
    match accept(&mut parts, handler, &hub).await {
        Ok(response) => response,
        Err(refusal) => refuse(&hub, &parts, refusal),
    }
}

/// Answers a refused upgrade: logs it once (rate-limited, see
/// [`crate::hub::refusals`]) and names it in `X-Request-Id`, so that the
/// developer whose browser saw only close 1006 can find the reason.
fn refuse(hub: &Hub, parts: &Parts, refusal: HttpError) -> Response {
    let request_id = request_id(parts.headers.get("x-request-id"));
    let client = parts
        .extensions
        .get::<ClientIp>()
        .map(|ip| ip.0)
        .or_else(|| {
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|info| info.0.ip())
        });
    hub.refusal_log().record(
        refusals::refusal(
            Some(parts.uri.path()),
            refusal.status.as_u16(),
            refusal.code,
            client,
            request_id.clone(),
        ),
        &refusal.message,
    );
    let mut response = refusal.into_response();
    if let Ok(value) = http::HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

/// Checks and accepts an upgrade request: the 101 response, with the
/// connection's task started once the upgrade completes; or the refusal.
async fn accept<H: Handler>(
    parts: &mut Parts,
    handler: Arc<H>,
    hub: &Hub,
) -> Result<Response, HttpError> {
    let accept = accept_key(&parts.method, parts.version, &parts.headers)
        .inspect_err(|_| hub.metrics().error(ErrorKind::Handshake))?;
    if hub.is_draining() {
        // Before the security checks: nothing is spent on a client that
        // must go to another node anyway.
        return Err(crate::hub::drain::refusal());
    }
    let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
        return Err(HttpError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "upgrade_unavailable",
            "this server cannot upgrade connections: serve the router with switchboard::serve or axum::serve over HTTP/1.1",
        ));
    };
    let slot = parts.extensions.remove::<ConnSlot>();
    let admitted = admit(hub, parts, H::SUBPROTOCOLS).await?;
    let deflate = negotiate(
        &hub.limits().compression,
        parts
            .headers
            .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
            .iter(),
    );

    let mut conn = Conn::new(hub.clone());
    let state = match AssertUnwindSafe(handler.connect(parts, &mut conn))
        .catch_unwind()
        .await
    {
        Ok(result) => result?,
        Err(_) => {
            conn.hub().metrics().error(ErrorKind::HandlerPanic);
            return Err(HttpError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the connect handler panicked",
            ));
        }
    };
    if let Some(expires_at) = admitted.expires_at {
        // Credentials that expire while connected: closed with 4002 after
        // the grace period, by the hub's one timer task.
        let left = expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let grace = conn.hub().security().expiry_grace;
        conn.close_at(
            tokio::time::Instant::now() + left.saturating_add(grace),
            CloseFrame::new(
                CloseCode::TOKEN_EXPIRED,
                "token expired: reconnect with a new token",
            ),
        );
    }

    let agreed = deflate.as_ref().map(|(agreed, _)| *agreed);
    let ip = admitted.ip;
    tokio::spawn(async move {
        let admission = Admission::new(slot.as_ref().and_then(ConnSlot::take), ip);
        match on_upgrade.await {
            // A task of its own, sized for the connection alone: this one
            // (holding the upgrade future) ends here.
            Ok(upgraded) => run_upgraded(upgraded, handler, state, conn, admission, agreed),
            // The client went away between our 101 and the upgrade; dropping
            // `conn` undoes whatever `connect` registered.
            Err(err) => tracing::debug!(%err, "upgrade failed after 101"),
        }
    });

    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, http::HeaderValue::from_static("websocket"));
    headers.insert(
        header::CONNECTION,
        http::HeaderValue::from_static("Upgrade"),
    );
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    if let Some(protocol) = admitted.protocol {
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            http::HeaderValue::from_static(protocol),
        );
    }
    if let Some((_, extension)) = deflate {
        headers.insert(header::SEC_WEBSOCKET_EXTENSIONS, extension);
    }
    Ok(response)
}

/// What the security checks let through.
struct Admitted {
    ip: Option<IpGuard>,
    protocol: Option<&'static str>,
    expires_at: Option<SystemTime>,
}

/// The security checks of an upgrade, cheapest first, each refusal counted
/// in the metrics:
///
/// 1. the client's IP (`X-Forwarded-For` only from trusted proxies) and its
///    per-IP limits (429 with `Retry-After`), before anything costly, so a
///    client guessing tokens is slowed down too;
/// 2. the `Origin` allow-list (403 `origin_not_allowed`);
/// 3. the subprotocol (the first of the handler's `SUBPROTOCOLS` the client offered);
/// 4. the authenticator (401), whose [`Identity`] is put in the request's
///    extensions for the handler's `connect`.
async fn admit(
    hub: &Hub,
    parts: &mut Parts,
    subprotocols: &[&'static str],
) -> Result<Admitted, HttpError> {
    let security = hub.security();
    let metrics = hub.metrics();
    let mut ip = None;
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip());
    if let Some(peer) = peer {
        let client = security
            .trusted_proxies
            .client_ip(peer, &parts.headers)
            .inspect_err(|_| metrics.error(ErrorKind::Handshake))?;
        parts.extensions.insert(ClientIp(client));
        let limits = hub.limits();
        ip = hub
            .ip_limiter()
            .admit(
                client,
                limits.max_connections_per_ip,
                limits.max_connection_rate_per_ip,
            )
            .inspect_err(|err| {
                metrics.error(ErrorKind::IpLimited);
                tracing::debug!(%client, code = err.code, "upgrade refused by the per-IP limits");
            })?;
    }
    if let Some(allowed) = &security.allowed_origins
        && let Some(origin) = parts.headers.get(header::ORIGIN)
    {
        let origin = String::from_utf8_lossy(origin.as_bytes());
        if !allowed.allows(&origin) {
            metrics.error(ErrorKind::Forbidden);
            return Err(HttpError::new(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                format!(
                    "origin {:?} may not open WebSockets on this server: add it to allowed_origins",
                    origin.chars().take(100).collect::<String>()
                ),
            ));
        }
    }
    let protocol = negotiate_subprotocol(parts, subprotocols)
        .inspect_err(|_| metrics.error(ErrorKind::Handshake))?;
    if let Some(name) = protocol {
        parts.extensions.insert(Subprotocol(name));
    }
    let mut expires_at = None;
    if let Some(authenticator) = &security.authenticator {
        let identity = match AssertUnwindSafe(authenticator.authenticate(parts))
            .catch_unwind()
            .await
        {
            Ok(Ok(identity)) => identity,
            Ok(Err(refusal)) => {
                metrics.error(ErrorKind::Unauthorized);
                return Err(refusal);
            }
            Err(_) => {
                metrics.error(ErrorKind::HandlerPanic);
                return Err(HttpError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "the authenticator panicked",
                ));
            }
        };
        expires_at = identity.expires_at;
        parts.extensions.insert::<Identity>(identity);
    }
    Ok(Admitted {
        ip,
        protocol,
        expires_at,
    })
}

/// Takes the raw `TcpStream` back from hyper when the connection is plain
/// TCP, so the runtime works on the socket directly with hyper's buffers
/// freed; any other transport (TLS) runs through hyper's `Upgraded`. Each
/// transport gets a task sized for it alone.
fn run_upgraded<H: Handler>(
    upgraded: Upgraded,
    handler: Arc<H>,
    state: H::State,
    conn: Conn<H::Info>,
    admission: Admission,
    deflate: Option<Agreed>,
) {
    let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let io = parts.io.into_inner();
            session::spawn(io, parts.read_buf, handler, state, conn, admission, deflate);
            return;
        }
        Err(upgraded) => upgraded,
    };
    // TLS terminated by `serve`: the same, with rustls' stream.
    #[cfg(feature = "tls")]
    let upgraded = match upgraded.downcast::<TokioIo<super::tls::ServerStream>>() {
        Ok(parts) => {
            let io = parts.io.into_inner();
            session::spawn(io, parts.read_buf, handler, state, conn, admission, deflate);
            return;
        }
        Err(upgraded) => upgraded,
    };
    let io = TokioIo::new(upgraded);
    session::spawn(io, Bytes::new(), handler, state, conn, admission, deflate);
}
