//! The backend's HTTP API, mounted at `/api` by [`app()`](crate::app()).
//!
//! | request | body | answer |
//! |---------|------|--------|
//! | `POST /api/send` | `{"targets":[…],"payload":X}` | `{"delivered":[…],"offline":[…],"dropped":[…]}`, plus `"unconfirmed":[…]` when a clustered backend could not confirm some |
//! | `POST /api/publish` | `{"topic":"…","payload":X}` | `{"recipients":N}` |
//! | `GET /api/connections[?scope=cluster\|local]` | | `{"clients":[{"id","connections","connected_since_unix_ms"}],"clients_total":N,"connections_open":N}`; a clustered backend adds `"scope"` and `"node"` |
//! | `DELETE /api/connections/{id}` | | `{"closed":N}`; the connections get close code 4000; 404 if none |
//! | `POST /api/drain` | none | starts draining this node ([`Hub::drain`]): `{"draining":true,"started_now":…,"window_ms","grace_ms","elapsed_ms","v1_connections","plain_connections"}`; a second call reports the drain under way (`"started_now":false`) |
//! | `GET /api/presence/{topic}[?mode=full\|count]` | | `{"topic","rev","count","members":[{"id","conns","since_ms","meta"?}]}` over the whole cluster (no `members` with `mode=count`; `"truncated":true` instead above `v1.presence_max_members`); 400 `invalid_topic`, 503 `presence_unavailable` |
//!
//! A `/api/send` report lists every target the caller wrote, in the order
//! written and spelled as written (integer or string), each in exactly one
//! list; a target written twice (`1` and `"1"` are the same ID) is listed
//! twice, in the list of its ID, though the ID gets the message once. So
//! `{"targets":["1",1,"x"]}` with client 1 connected answers
//! `{"delivered":["1",1],"offline":["x"],"dropped":[]}`.
//!
//! Errors are JSON (`{"error":{"code","message"}}`) with status 400 for a
//! bad body (the same codes as the relay's error frames), 404 for an
//! unknown ID, 408 for a body that did not arrive within
//! `limits.body_timeout` (then the connection is closed), 413 for a body
//! over `limits.max_message_size`.
//!
//! With [`Security::api_keys`](crate::Security::api_keys) set on the hub,
//! every route needs `Authorization: Bearer <key>`: without one, 401
//! `missing_api_key`; with a wrong one, 401 `invalid_api_key`.
//!
//! The API is for backends, not browsers. A request with an `Origin`
//! header (a browser's) is refused with 403 `origin_not_allowed` unless
//! that origin is the server's own (the `Origin` names the request's
//! `Host`) or is in [`Security::allowed_origins`](crate::Security::allowed_origins)
//! — unset, that is no other origin. Bodies must be sent as
//! `Content-Type: application/json` (415 `unsupported_media_type`
//! otherwise), which a browser sends to another site only after a
//! preflight this server never approves. The `Host` check that stops DNS
//! rebinding is [`serve`](crate::serve)'s, for every route
//! ([`Security::allowed_hosts`](crate::Security::allowed_hosts)).

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http::{StatusCode, header};
use serde_json::json;

use super::relay::{self, RequestError};
use crate::auth::{ApiKeys, is_same_origin};
use crate::backend::PresenceMode;
use crate::backend::presence::frame::push_snapshot;
use crate::http::deadline::is_body_timeout;
use crate::http_error::HttpError;
use crate::hub::Hub;
use crate::id::{ClientId, Topic};
use crate::metrics::ErrorKind;
use crate::protocol::close::{CloseCode, CloseFrame};
use crate::runtime::delivery::Envelope;

/// The API routes, to be nested under `/api`; behind the hub's API keys
/// when it has any, and refusing browsers of other origins.
pub fn router(hub: Hub) -> Router {
    let keys = hub.security().api_keys.clone();
    let router = Router::new()
        .route("/send", post(send))
        .route("/publish", post(publish))
        .route("/connections", get(connections))
        .route("/connections/{id}", delete(disconnect))
        .route("/drain", post(drain))
        .route("/presence/{*topic}", get(presence))
        .with_state(hub.clone());
    // The origin check is the outer layer: it runs before the key check.
    protect(router, &keys).layer(middleware::from_fn_with_state(hub, browser_origin))
}

/// Refuses an API request a browser sent from another site: 403
/// `origin_not_allowed` unless its `Origin` is absent (not a browser), names
/// the server itself (the request's `Host`), or is in `allowed_origins`.
///
/// Why: the API is for backends. With the development defaults (loopback,
/// no API key) any page the user visits could otherwise make the browser
/// `POST` to `http://127.0.0.1:8080/api/send`; with keys, a page cannot
/// attach one, but refusing it here costs nothing and says why. The JSON
/// content type ([`json_body`]) stops the same requests a second way:
/// browsers must ask first (preflight) before sending it across sites, and
/// the server answers no preflight.
pub(crate) async fn browser_origin(
    State(hub): State<Hub>,
    request: Request,
    next: Next,
) -> Response {
    let allowed_origins = &hub.security().allowed_origins;
    let host = request.uri().authority().map(|a| a.as_str()).or_else(|| {
        request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    });
    for origin in request.headers().get_all(header::ORIGIN) {
        let origin = String::from_utf8_lossy(origin.as_bytes());
        let allowed = host.is_some_and(|host| is_same_origin(&origin, host))
            || allowed_origins.as_ref().is_some_and(|a| a.allows(&origin));
        if !allowed {
            hub.metrics().error(ErrorKind::Forbidden);
            return HttpError::new(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                format!(
                    "origin {:?} may not call the API: browsers may call it only from the server's own origin or one in allowed_origins (backends send no Origin)",
                    origin.chars().take(100).collect::<String>()
                ),
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// The body of a JSON request: 415 `unsupported_media_type` unless it says
/// `Content-Type: application/json` (parameters such as `charset` aside),
/// then [`body`].
///
/// Why insist: `text/plain` and form bodies are what a browser sends
/// across sites without asking first; `application/json` it sends only
/// after a preflight the server never approves.
async fn json_body(hub: &Hub, request: Request) -> Result<Bytes, HttpError> {
    let content_type = request.headers().get(header::CONTENT_TYPE);
    let media_type = content_type
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim);
    if !media_type.is_some_and(|t| t.eq_ignore_ascii_case("application/json")) {
        hub.metrics().error(ErrorKind::BadRequest);
        let got = match content_type {
            Some(value) => format!(
                "{:?}",
                String::from_utf8_lossy(value.as_bytes())
                    .chars()
                    .take(100)
                    .collect::<String>()
            ),
            None => "none".to_owned(),
        };
        return Err(HttpError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "the body must be JSON sent with `Content-Type: application/json` (got {got}); with curl: -H 'Content-Type: application/json'"
            ),
        ));
    }
    body(hub, request).await
}

/// Puts `router` behind `keys` (a no-op when there are none): a request
/// without `Authorization: Bearer <one of the keys>` gets 401 JSON.
pub fn protect(router: Router, keys: &ApiKeys) -> Router {
    if keys.is_empty() {
        return router;
    }
    router.layer(middleware::from_fn_with_state(
        keys.clone(),
        crate::auth::require_api_key,
    ))
}

async fn body(hub: &Hub, request: Request) -> Result<Bytes, HttpError> {
    let limit = hub.limits().max_message_size;
    axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|err| {
            let err = err.into_inner();
            if err.is::<http_body_util::LengthLimitError>() {
                HttpError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("the request body is over {limit} bytes (limits.max_message_size)"),
                )
            } else if is_body_timeout(&*err) {
                // `serve` answers 408 `body_timeout` in place of this.
                HttpError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    "the request body did not arrive in time (limits.body_timeout)",
                )
            } else {
                hub.metrics().error(ErrorKind::BadRequest);
                HttpError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    format!("the request body could not be read: {err}"),
                )
            }
        })
}

fn bad_request(hub: &Hub, err: RequestError) -> HttpError {
    hub.metrics().error(ErrorKind::BadRequest);
    HttpError::new(StatusCode::BAD_REQUEST, err.code, err.message)
}

#[utoipa::path(
    post,
    path = "/api/send",
    tag = "api",
    request_body(content = crate::app::schemas::SendRequest, content_type = "application/json"),
    security(("api_key" = []), ()),
    responses(
        (status = 200, description = "The delivery report", body = crate::app::schemas::DeliveryReport),
        (status = 400, description = "A bad body: `invalid_json`, `missing_targets`, `invalid_targets`, `too_many_targets`, `invalid_target`, `missing_payload`, `invalid_body`", body = crate::app::schemas::ErrorBody),
        (status = 413, description = "`body_too_large`: over `limits.max_message_size`", body = crate::app::schemas::ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not `Content-Type: application/json`", body = crate::app::schemas::ErrorBody),
        (status = 401, description = "`missing_api_key`, `invalid_api_key`", body = crate::app::schemas::ErrorBody),
        (status = 403, description = "`origin_not_allowed`: a browser of another origin", body = crate::app::schemas::ErrorBody),
    ),
)]
pub(crate) async fn send(State(hub): State<Hub>, request: Request) -> Result<Response, HttpError> {
    let bytes = json_body(&hub, request).await?;
    let (targets, payload) =
        relay::parse_send(&bytes, hub.limits().max_targets).map_err(|e| bad_request(&hub, e))?;
    let message = Envelope::json(Bytes::copy_from_slice(payload.get().as_bytes()));
    let report = hub.deliver(&targets.ids, &Arc::new(message)).await;
    // Written by hand in serde_json's key order, as it always was.
    let answer = format!("{{{}}}", targets.report_lists(&report));
    Ok(([(http::header::CONTENT_TYPE, "application/json")], answer).into_response())
}

#[utoipa::path(
    post,
    path = "/api/publish",
    tag = "api",
    request_body(content = crate::app::schemas::PublishRequest, content_type = "application/json"),
    security(("api_key" = []), ()),
    responses(
        (status = 200, description = "How many connections got it", body = crate::app::schemas::PublishReport),
        (status = 400, description = "A bad body: `invalid_json`, `missing_topic`, `invalid_topic`, `missing_payload`, `invalid_body`", body = crate::app::schemas::ErrorBody),
        (status = 413, description = "`body_too_large`: over `limits.max_message_size`", body = crate::app::schemas::ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not `Content-Type: application/json`", body = crate::app::schemas::ErrorBody),
        (status = 401, description = "`missing_api_key`, `invalid_api_key`", body = crate::app::schemas::ErrorBody),
        (status = 403, description = "`origin_not_allowed`: a browser of another origin", body = crate::app::schemas::ErrorBody),
    ),
)]
pub(crate) async fn publish(
    State(hub): State<Hub>,
    request: Request,
) -> Result<Response, HttpError> {
    let bytes = json_body(&hub, request).await?;
    let (topic, payload) = relay::parse_publish(&bytes).map_err(|e| bad_request(&hub, e))?;
    let frame = Hub::encode_text(Bytes::copy_from_slice(payload.get().as_bytes()));
    let recipients = hub.publish(&topic, &frame).await;
    Ok(Json(json!({ "recipients": recipients })).into_response())
}

/// `?scope=cluster` (the default) or `?scope=local`. With a single-node
/// backend both are this node and the answer has no `scope` key; with a
/// clustered one the answer says which it is (`"scope"`, `"node"`), and a
/// cluster listing that cannot be made (the backplane is down) falls back to
/// this node's with `"degraded": true`.
#[utoipa::path(
    get,
    path = "/api/connections",
    tag = "api",
    params(("scope" = Option<String>, Query, description = "`cluster` (the default) or `local`", pattern = "^(cluster|local)$")),
    security(("api_key" = []), ()),
    responses(
        (status = 200, description = "Every client ID with its connections", body = crate::app::schemas::Connections),
        (status = 400, description = "`invalid_query`", body = crate::app::schemas::ErrorBody),
        (status = 401, description = "`missing_api_key`, `invalid_api_key`", body = crate::app::schemas::ErrorBody),
        (status = 403, description = "`origin_not_allowed`: a browser of another origin", body = crate::app::schemas::ErrorBody),
    ),
)]
pub(crate) async fn connections(
    State(hub): State<Hub>,
    uri: http::Uri,
) -> Result<Response, HttpError> {
    let scope = crate::query::param(&uri, "scope")?;
    let local_only = match scope.as_deref() {
        None | Some("cluster") => false,
        Some("local") => true,
        Some(other) => {
            return Err(HttpError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!("unknown scope {other:?}: use \"cluster\" or \"local\""),
            ));
        }
    };
    let backend = hub.backend();
    let health = backend.health();
    let (clients, scope, degraded) = match (&health.node, local_only) {
        (None, _) => (backend.clients().await, None, false),
        (Some(_), true) => (backend.clients().await, Some("local"), false),
        (Some(_), false) => match backend.cluster_clients().await {
            Some(clients) => (clients, Some("cluster"), false),
            None => (backend.clients().await, Some("local"), true),
        },
    };
    let mut answer = json!({
        "clients_total": clients.len(),
        "connections_open": hub.live_connections(),
        "clients": clients,
    });
    if let (Some(scope), Some(node)) = (scope, &health.node) {
        answer["scope"] = scope.into();
        answer["node"] = node.as_str().into();
        if degraded {
            answer["degraded"] = true.into();
        }
    }
    Ok(Json(answer).into_response())
}

/// A topic's presence over the cluster (docs/protocol-v1.md, "Presence").
#[utoipa::path(
    get,
    path = "/api/presence/{topic}",
    tag = "api",
    params(
        ("topic" = String, Path, description = "The topic (may contain `/`)", pattern = r"^[A-Za-z0-9_.:@/-]{1,128}$"),
        ("mode" = Option<String>, Query, description = "`full` (members, the default) or `count`", pattern = "^(full|count)$"),
    ),
    security(("api_key" = []), ()),
    responses(
        (status = 200, description = "The topic's presence over the cluster", body = crate::app::schemas::Presence),
        (status = 400, description = "`invalid_topic`, `invalid_query`", body = crate::app::schemas::ErrorBody),
        (status = 401, description = "`missing_api_key`, `invalid_api_key`", body = crate::app::schemas::ErrorBody),
        (status = 403, description = "`origin_not_allowed`: a browser of another origin", body = crate::app::schemas::ErrorBody),
        (status = 503, description = "`presence_unavailable`: the backend cannot read presence now", body = crate::app::schemas::ErrorBody),
    ),
)]
pub(crate) async fn presence(
    State(hub): State<Hub>,
    Path(topic): Path<String>,
    uri: http::Uri,
) -> Result<Response, HttpError> {
    let topic = Topic::new(&topic).map_err(|e| {
        HttpError::new(
            StatusCode::BAD_REQUEST,
            "invalid_topic",
            format!("invalid topic in /api/presence/{{topic}}: {e}"),
        )
    })?;
    let mode = match crate::query::param(&uri, "mode")?.as_deref() {
        None | Some("full") => PresenceMode::Full,
        Some("count") => PresenceMode::Count,
        Some(other) => {
            return Err(HttpError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!(
                    "unknown mode {:?}: use \"full\" (members) or \"count\"",
                    other.chars().take(40).collect::<String>()
                ),
            ));
        }
    };
    let snapshot = hub.backend().presence(&topic, mode).await.ok_or_else(|| {
        HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "presence_unavailable",
            "presence cannot be read now (the backend has none, or lost its backplane): retry later",
        )
    })?;
    // `{"topic":…,` then the snapshot object's fields.
    let mut snapshot_json = String::with_capacity(64 + 64 * snapshot.members.len());
    push_snapshot(&mut snapshot_json, &snapshot, mode);
    let mut body = String::with_capacity(snapshot_json.len() + 32);
    body.push_str(r#"{"topic":"#);
    crate::runtime::delivery::push_json_str(&mut body, topic.as_str());
    body.push(',');
    body.push_str(&snapshot_json[1..]);
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

#[utoipa::path(
    delete,
    path = "/api/connections/{id}",
    tag = "api",
    params(("id" = String, Path, description = "The client ID", pattern = r"^[A-Za-z0-9_.:@-]{1,128}$")),
    security(("api_key" = []), ()),
    responses(
        (status = 200, description = "Its connections were closed with 4000", body = crate::app::schemas::Disconnected),
        (status = 400, description = "`invalid_id`", body = crate::app::schemas::ErrorBody),
        (status = 404, description = "`not_found`: the ID has no open connection", body = crate::app::schemas::ErrorBody),
        (status = 503, description = "`backend_degraded`: not here, and the other nodes cannot be reached", body = crate::app::schemas::ErrorBody),
        (status = 401, description = "`missing_api_key`, `invalid_api_key`", body = crate::app::schemas::ErrorBody),
        (status = 403, description = "`origin_not_allowed`: a browser of another origin", body = crate::app::schemas::ErrorBody),
    ),
)]
pub(crate) async fn disconnect(
    State(hub): State<Hub>,
    Path(id): Path<String>,
) -> Result<Response, HttpError> {
    let id = ClientId::new(&id).map_err(|e| {
        HttpError::new(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            format!("invalid id: {e}"),
        )
    })?;
    let closed = hub
        .backend()
        .disconnect(
            &id,
            CloseFrame::new(CloseCode::DISCONNECTED, "disconnected by the server's API"),
        )
        .await;
    if closed == 0 && !hub.backend().health().healthy {
        return Err(HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "backend_degraded",
            format!(
                "client id {id} has no connection on this node, and the other nodes cannot be reached now"
            ),
        ));
    }
    if closed == 0 {
        return Err(HttpError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("client id {id} has no open connection"),
        ));
    }
    Ok(Json(json!({ "closed": closed })).into_response())
}

/// Starts draining this node (or reports the drain under way). The
/// `switchboard` binary exits once the drain has finished, as after
/// SIGTERM. No body is read: there is nothing to choose, the window and
/// grace are the server's `[drain]` settings.
#[utoipa::path(
    post,
    path = "/api/drain",
    tag = "api",
    security(("api_key" = []), ()),
    responses(
        (status = 200, description = "The drain under way (started by this call or before)", body = crate::app::schemas::DrainReport),
        (status = 401, description = "`missing_api_key`, `invalid_api_key`", body = crate::app::schemas::ErrorBody),
        (status = 403, description = "`origin_not_allowed`: a browser of another origin", body = crate::app::schemas::ErrorBody),
    ),
)]
pub(crate) async fn drain(State(hub): State<Hub>) -> Response {
    let report = hub.drain();
    Json(json!({
        "draining": true,
        "started_now": report.started_now,
        "window_ms": report.limits.window.as_millis() as u64,
        "grace_ms": report.limits.grace.as_millis() as u64,
        "elapsed_ms": report.elapsed.as_millis() as u64,
        "v1_connections": report.v1_connections,
        "plain_connections": report.plain_connections,
    }))
    .into_response()
}
