//! The operator's dashboard: a page at `/dashboard` (embedded files, see
//! [`assets`]) and the API routes behind it — `POST /api/stats/ticket`,
//! `GET /api/stats`, `GET /api/stats/stream` (Server-Sent Events).
//!
//! The page holds the API key in the tab's `sessionStorage` and sends it
//! as `Authorization: Bearer` like any API client; the event stream, which
//! a browser cannot send headers to, opens with a single-use ticket
//! ([`tickets`]). Without API keys (loopback development) everything is
//! open, as the API is.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use crate::hub::Hub;

pub(crate) mod assets;
pub(crate) mod stats;
pub(crate) mod stream;
pub(crate) mod tickets;

use stats::NodesCache;
use tickets::{TICKET_TTL, Tickets};

/// What the dashboard's routes share.
pub(crate) struct Dashboard {
    hub: Hub,
    tickets: Tickets,
    nodes: NodesCache,
}

/// `GET /dashboard` and its files; no key needed (they hold no data).
pub(crate) fn pages() -> Router {
    Router::new()
        .route("/dashboard", get(assets::index))
        .route("/dashboard/", get(assets::index))
        .route("/dashboard/{file}", get(assets::file))
}

/// The API routes of the dashboard, to be nested under `/api`: the first
/// router goes behind the API keys, the second (the stream) checks them
/// itself.
pub(crate) fn api_routes(hub: Hub) -> (Router, Router) {
    let dashboard = Arc::new(Dashboard {
        hub,
        tickets: Tickets::default(),
        nodes: NodesCache::default(),
    });
    let keyed = Router::new()
        .route("/stats", get(stats_now))
        .route("/stats/ticket", post(ticket))
        .with_state(Arc::clone(&dashboard));
    let own_auth = Router::new()
        .route("/stats/stream", get(stream::stats_stream))
        .with_state(dashboard);
    (keyed, own_auth)
}

/// A ticket that opens `GET /api/stats/stream?ticket=…` once.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Ticket {
    /// 32 hex digits (128 random bits).
    pub(crate) ticket: String,
    /// How long it stays valid unspent, in milliseconds.
    pub(crate) expires_in_ms: u64,
}

/// `POST /api/stats/ticket`: a single-use ticket for the event stream.
#[utoipa::path(
    post,
    path = "/api/stats/ticket",
    tag = "dashboard",
    security(("api_key" = []), ()),
    responses(
        (status = 200, description = "A ticket, valid 30 s", body = Ticket),
        (status = 429, description = "`too_many_tickets`: 10,000 are waiting to be used", body = crate::app::schemas::ErrorBody),
        (status = 401, description = "`missing_api_key`, `invalid_api_key`", body = crate::app::schemas::ErrorBody),
        (status = 403, description = "`origin_not_allowed`: a browser of another origin", body = crate::app::schemas::ErrorBody),
    ),
)]
pub(crate) async fn ticket(
    State(dashboard): State<Arc<Dashboard>>,
) -> Result<Json<Ticket>, crate::http_error::HttpError> {
    Ok(Json(Ticket {
        ticket: dashboard.tickets.issue()?,
        expires_in_ms: TICKET_TTL.as_millis() as u64,
    }))
}

/// `GET /api/stats`: one sample of the counters, errors, refusals and nodes.
#[utoipa::path(
    get,
    path = "/api/stats",
    tag = "dashboard",
    security(("api_key" = []), ()),
    responses(
        (status = 200, description = "A sample", body = stats::Stats),
        (status = 401, description = "`missing_api_key`, `invalid_api_key`", body = crate::app::schemas::ErrorBody),
        (status = 403, description = "`origin_not_allowed`: a browser of another origin", body = crate::app::schemas::ErrorBody),
    ),
)]
pub(crate) async fn stats_now(State(dashboard): State<Arc<Dashboard>>) -> Json<stats::Stats> {
    Json(stats::sample(&dashboard.hub, &dashboard.nodes).await)
}
