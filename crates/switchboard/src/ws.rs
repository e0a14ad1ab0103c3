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

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any};
use bytes::Bytes;
use futures_util::FutureExt as _;
use http::{StatusCode, header};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use crate::conn::Conn;
use crate::handler::Handler;
use crate::http_error::HttpError;
use crate::hub::Hub;
use crate::metrics::ErrorKind;
use crate::protocol::deflate::{Agreed, negotiate};
use crate::protocol::handshake::accept_key;
use crate::runtime;

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
pub(crate) struct ConnSlot(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl ConnSlot {
    pub(crate) fn new(permit: OwnedSemaphorePermit) -> Self {
        Self(Arc::new(Mutex::new(Some(permit))))
    }

    fn take(&self) -> Option<OwnedSemaphorePermit> {
        self.0.lock().take()
    }
}

async fn upgrade<H: Handler>(request: Request, handler: Arc<H>, hub: Hub) -> Response {
    let (mut parts, _body) = request.into_parts();
    let accept = match accept_key(&parts.method, parts.version, &parts.headers) {
        Ok(accept) => accept,
        Err(err) => {
            hub.metrics().error(ErrorKind::Handshake);
            return err.into_response();
        }
    };
    let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
        return HttpError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "upgrade_unavailable",
            "this server cannot upgrade connections: serve the router with switchboard::serve or axum::serve over HTTP/1.1",
        )
        .into_response();
    };
    let slot = parts.extensions.remove::<ConnSlot>();
    let deflate = negotiate(
        &hub.limits().compression,
        parts
            .headers
            .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
            .iter(),
    );

    let mut conn = Conn::new(hub);
    let state = match AssertUnwindSafe(handler.connect(&parts, &mut conn))
        .catch_unwind()
        .await
    {
        Ok(Ok(state)) => state,
        Ok(Err(refusal)) => return refusal.into_response(),
        Err(_) => {
            conn.hub().metrics().error(ErrorKind::HandlerPanic);
            return HttpError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the connect handler panicked",
            )
            .into_response();
        }
    };

    let agreed = deflate.as_ref().map(|(agreed, _)| *agreed);
    tokio::spawn(async move {
        let permit = slot.as_ref().and_then(ConnSlot::take);
        match on_upgrade.await {
            // A task of its own, sized for the connection alone: this one
            // (holding the upgrade future) ends here.
            Ok(upgraded) => run_upgraded(upgraded, handler, state, conn, permit, agreed),
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
    if let Some((_, extension)) = deflate {
        headers.insert(header::SEC_WEBSOCKET_EXTENSIONS, extension);
    }
    response
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
    permit: Option<OwnedSemaphorePermit>,
    deflate: Option<Agreed>,
) {
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let io = parts.io.into_inner();
            runtime::spawn(io, parts.read_buf, handler, state, conn, permit, deflate);
        }
        Err(upgraded) => {
            let io = TokioIo::new(upgraded);
            runtime::spawn(io, Bytes::new(), handler, state, conn, permit, deflate);
        }
    }
}
