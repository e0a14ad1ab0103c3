//! The `switchboard` server's routes, as a router you can serve yourself or
//! extend.
//!
//! ```no_run
//! use switchboard::{Hub, Limits};
//!
//! # async fn run() -> std::io::Result<()> {
//! let hub = Hub::new(Limits::default());
//! let app = switchboard::app(hub.clone())
//!     .route("/version", axum::routing::get(|| async { "1.0" }));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! switchboard::serve(listener, app, hub, std::future::pending()).await
//! # }
//! ```

use std::fmt::Write as _;

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use http::header;

use crate::auth::ApiKeys;
use crate::http::ws;
use crate::hub::Hub;

pub mod api;
pub(crate) mod browse;
pub(crate) mod dashboard;
pub mod handlers;
pub(crate) mod json_scan;
pub mod openapi;
pub mod relay;
pub(crate) mod schemas;
pub(crate) mod v1;

use api::{browser_origin, protect};
use handlers::{Chat, Echo, Relay};

/// Every built-in endpoint:
///
/// | route | what |
/// |-------|------|
/// | `GET /ws?id=N` | the relay ([`Relay`]) |
/// | `GET /echo` | echo ([`Echo`]) |
/// | `GET /chat` | broadcast chat ([`Chat`]) |
/// | `GET /heartbeat` | 200 `{"status":"ok"}`; `{"status":"degraded",…}` while a clustered backend has lost its backplane; `{"status":"draining",…}` while draining |
/// | `GET /ready` | 200 `{"status":"ready"}` while the node takes new connections; 503 `draining` (with `Retry-After`) once a drain has started: for load balancers' readiness checks |
/// | `GET /metrics` | Prometheus text |
/// | `/api/…` | the backend API ([`crate::api`]) |
/// | `GET /api/ids`, `GET /api/topics` | client IDs and topics, paged by cursor |
/// | `GET /api/stats`, `POST /api/stats/ticket`, `GET /api/stats/stream` | the dashboard's live data (Server-Sent Events) |
/// | `GET /api/openapi.json` | the OpenAPI 3.1 description of all of these ([`openapi`]) |
/// | `GET /dashboard` | the operator's dashboard (embedded page) |
///
/// With API keys in the hub's [`Security`](crate::Security), `/api/…`
/// needs one, and so do `/metrics` and `/heartbeat` (with `/ready`) when
/// `protect_metrics` / `protect_heartbeat` say so.
pub fn app(hub: Hub) -> Router {
    let security = hub.security();
    let keys = &security.api_keys;
    let heartbeat = Router::new()
        .route("/heartbeat", get(heartbeat))
        .route("/ready", get(ready))
        .with_state(hub.clone());
    let metrics = Router::new().route("/metrics", get(metrics).with_state(hub.clone()));
    let none = ApiKeys::default();
    let heartbeat = protect(
        heartbeat,
        if security.protect_heartbeat {
            keys
        } else {
            &none
        },
    );
    let metrics = protect(
        metrics,
        if security.protect_metrics {
            keys
        } else {
            &none
        },
    );
    // The operator's routes: behind the same keys and origin check as the
    // rest of `/api`; the event stream checks keys or a ticket itself, and
    // the OpenAPI document is open.
    let (dashboard_keyed, dashboard_stream) = dashboard::api_routes(hub.clone());
    let operator = protect(browse::router(hub.clone()).merge(dashboard_keyed), keys)
        .merge(dashboard_stream)
        .merge(openapi::router())
        .layer(axum::middleware::from_fn_with_state(
            hub.clone(),
            browser_origin,
        ));
    Router::new()
        .route("/ws", ws(hub.clone(), Relay))
        .route("/echo", ws(hub.clone(), Echo))
        .route("/chat", ws(hub.clone(), Chat::default()))
        .merge(heartbeat)
        .merge(metrics)
        .merge(dashboard::pages())
        .nest("/api", crate::api::router(hub).merge(operator))
}

/// `{"status":"ok"}`, or, while a clustered backend has lost its backplane,
/// `{"status":"degraded","backend":…,"node":…,"reason":…}` — still 200: the
/// node serves its own clients, and a load balancer that took every node out
/// when Redis is down would turn a degraded cluster into an outage.
///
/// While draining, `{"status":"draining","connections":N}`, still 200: the
/// node is alive and finishing its work (a liveness check that failed now
/// would have it killed before its clients moved); readiness is `/ready`'s.
#[utoipa::path(
    get,
    path = "/heartbeat",
    tag = "ops",
    security(("api_key" = []), ()),
    responses(
        (status = 200, description = "The node is up", body = schemas::Heartbeat),
        (status = 401, description = "`missing_api_key`, `invalid_api_key` (with `protect_heartbeat`)", body = schemas::ErrorBody),
    ),
)]
pub(crate) async fn heartbeat(State(hub): State<Hub>) -> impl IntoResponse {
    if hub.is_draining() {
        return axum::Json(serde_json::json!({
            "status": "draining",
            "connections": hub.live_connections(),
        }));
    }
    let health = hub.backend().health();
    if health.healthy {
        return axum::Json(serde_json::json!({ "status": "ok" }));
    }
    axum::Json(serde_json::json!({
        "status": "degraded",
        "backend": health.backend,
        "node": health.node,
        "reason": health.reason,
    }))
}

/// Readiness for load balancers: 200 `{"status":"ready"}` while this node
/// takes new connections, 503 `draining` with `Retry-After` once a drain
/// has started (the same answer a WebSocket upgrade gets then). A degraded
/// backend is still ready, for the reason `/heartbeat` gives.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "ops",
    security(("api_key" = []), ()),
    responses(
        (status = 200, description = "The node takes new connections", body = schemas::Heartbeat),
        (status = 401, description = "`missing_api_key`, `invalid_api_key` (with `protect_heartbeat`)", body = schemas::ErrorBody),
        (status = 503, description = "`draining`: a drain has started; try another node (`Retry-After`)", body = schemas::ErrorBody),
    ),
)]
pub(crate) async fn ready(State(hub): State<Hub>) -> axum::response::Response {
    if hub.is_draining() {
        return crate::hub::drain::refusal().into_response();
    }
    axum::Json(serde_json::json!({ "status": "ready" })).into_response()
}

/// Prometheus text.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    security(("api_key" = []), ()),
    responses(
        (status = 200, description = "The counters, in the Prometheus text format 0.0.4", content_type = "text/plain", body = String),
        (status = 401, description = "`missing_api_key`, `invalid_api_key` (with `protect_metrics`)", body = schemas::ErrorBody),
    ),
)]
pub(crate) async fn metrics(State(hub): State<Hub>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        {
            let mut text = hub.metrics().render(hub.live_connections());
            let _ = writeln!(
                text,
                "# HELP switchboard_refusals_total Connections refused before or at the upgrade (logged, rate-limited, with their reasons).\n# TYPE switchboard_refusals_total counter\nswitchboard_refusals_total {}",
                hub.refusals_total()
            );
            let _ = writeln!(
                text,
                "# HELP switchboard_draining 1 once this node has started draining (new upgrades get 503, /ready answers 503), else 0.\n# TYPE switchboard_draining gauge\nswitchboard_draining {}\n# HELP switchboard_drain_hints_total drain frames sent to switchboard.v1 connections.\n# TYPE switchboard_drain_hints_total counter\nswitchboard_drain_hints_total {}",
                u8::from(hub.is_draining()),
                hub.drain_hints_total()
            );
            hub.backend().render_metrics(&mut text);
            text
        },
    )
}
