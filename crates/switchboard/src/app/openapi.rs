//! The OpenAPI 3.1 description of every HTTP endpoint, generated from the
//! handlers' `#[utoipa::path]` attributes and the answer types, served at
//! `GET /api/openapi.json` (no key needed: it describes, it holds no data).
//!
//! The test suite keeps it honest: `tests/openapi.rs` checks that every
//! route of [`app()`](crate::app()) is described, and Schemathesis
//! (`scripts/check-openapi`) calls every operation of a live server and
//! checks each answer's status, content type and body against it.

use std::sync::OnceLock;

use axum::Router;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderValue, header};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::browse::{self, IdPage, TopicPage};
use super::dashboard::stats::Stats;
use super::dashboard::{self, Ticket};
use super::schemas::{
    Connections, DeliveryReport, Disconnected, DrainReport, ErrorBody, ErrorDetail, Heartbeat,
    Presence, PresenceMemberInfo, PublishReport, PublishRequest, SendRequest, Target,
};
use crate::backend::{BackendHealth, ClientInfo, NodeInfo, TopicInfo};
use crate::hub::refusals::Refusal;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Switchboard",
        description = "The HTTP API of the `switchboard` server. With API keys configured (`api.keys`), every `/api` operation but `GET /api/openapi.json` needs `Authorization: Bearer <key>`. On every route: 400 `missing_host`/`invalid_host` and 421 `host_not_allowed` for a `Host` the server does not answer to, 503 `over_capacity` at the connection limit, 408 `body_timeout` for a body that does not arrive in time, 405 `method_not_allowed` for another method.",
        license(name = "MIT OR Apache-2.0"),
    ),
    paths(
        super::api::send,
        super::api::publish,
        super::api::connections,
        super::api::disconnect,
        super::api::drain,
        super::api::presence,
        browse::ids,
        browse::topics,
        dashboard::ticket,
        dashboard::stats_now,
        dashboard::stream::stats_stream,
        openapi_json,
        super::heartbeat,
        super::ready,
        super::metrics,
        dashboard::assets::index,
        dashboard::assets::file,
        ws_relay,
        ws_echo,
        ws_chat,
    ),
    components(schemas(
        ErrorBody, ErrorDetail, Target, SendRequest, DeliveryReport, PublishRequest,
        PublishReport, Connections, Disconnected, Heartbeat, DrainReport, Presence,
        PresenceMemberInfo, ClientInfo, TopicInfo, NodeInfo,
        IdPage, TopicPage, Ticket, Stats, BackendHealth, Refusal,
    )),
    modifiers(&ApiKeyScheme),
    tags(
        (name = "api", description = "The backend API"),
        (name = "dashboard", description = "The operator's dashboard"),
        (name = "websocket", description = "WebSocket endpoints (upgrade only)"),
        (name = "ops", description = "Health and metrics"),
    ),
)]
struct ApiDoc;

/// Adds the `api_key` bearer scheme the operations refer to.
struct ApiKeyScheme;

impl Modify for ApiKeyScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "One of the server's API keys (`api.keys`). Without keys configured (loopback development) the API is open.",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document, as a value.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The route, to be nested under `/api`.
pub(crate) fn router() -> Router {
    Router::new().route("/openapi.json", get(openapi_json))
}

/// This document.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "api",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object)),
)]
pub(crate) async fn openapi_json() -> Response {
    static JSON: OnceLock<String> = OnceLock::new();
    let json = JSON.get_or_init(|| {
        document().to_json().unwrap_or_else(|err| {
            format!("{{\"error\":{{\"code\":\"internal_error\",\"message\":\"{err}\"}}}}")
        })
    });
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        json.as_str(),
    )
        .into_response()
}

/// The relay: `{"targets":[…],"payload":X}` in, the raw JSON of X out
/// (docs/protocol.md); `switchboard.v1` with that subprotocol
/// (docs/protocol-v1.md).
#[utoipa::path(
    get,
    path = "/ws",
    tag = "websocket",
    params(
        ("id" = String, Query, description = "This connection's client ID", pattern = r"^[A-Za-z0-9_.:@-]{1,128}$"),
        ("token" = Option<String>, Query, description = "A JWT when the server authenticates clients"),
    ),
    responses(
        (status = 101, description = "Switching to WebSocket"),
        (status = 400, description = "`bad_handshake`, `missing_id`, `invalid_id`, `invalid_query`, `unsupported_subprotocol`", body = ErrorBody),
        (status = 401, description = "`missing_token`, `invalid_token` (with an authenticator)", body = ErrorBody),
        (status = 403, description = "`origin_not_allowed`, `id_mismatch`", body = ErrorBody),
        (status = 409, description = "`id_in_use` (duplicate_ids = \"reject-new\")", body = ErrorBody),
        (status = 426, description = "`upgrade_required`: not a WebSocket upgrade", body = ErrorBody),
        (status = 429, description = "Per-IP limits", body = ErrorBody),
    ),
)]
#[allow(dead_code)]
fn ws_relay() {}

/// Echo: every message comes back.
#[utoipa::path(
    get,
    path = "/echo",
    tag = "websocket",
    responses(
        (status = 101, description = "Switching to WebSocket"),
        (status = 400, description = "`bad_handshake`, `unsupported_subprotocol`", body = ErrorBody),
        (status = 401, description = "`missing_token`, `invalid_token` (with an authenticator)", body = ErrorBody),
        (status = 403, description = "`origin_not_allowed`", body = ErrorBody),
        (status = 426, description = "`upgrade_required`: not a WebSocket upgrade", body = ErrorBody),
        (status = 429, description = "Per-IP limits", body = ErrorBody),
    ),
)]
#[allow(dead_code)]
fn ws_echo() {}

/// Chat: every message goes to every chat connection.
#[utoipa::path(
    get,
    path = "/chat",
    tag = "websocket",
    responses(
        (status = 101, description = "Switching to WebSocket"),
        (status = 400, description = "`bad_handshake`, `unsupported_subprotocol`", body = ErrorBody),
        (status = 401, description = "`missing_token`, `invalid_token` (with an authenticator)", body = ErrorBody),
        (status = 403, description = "`origin_not_allowed`", body = ErrorBody),
        (status = 426, description = "`upgrade_required`: not a WebSocket upgrade", body = ErrorBody),
        (status = 429, description = "Per-IP limits", body = ErrorBody),
    ),
)]
#[allow(dead_code)]
fn ws_chat() {}
