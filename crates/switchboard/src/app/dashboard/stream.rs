//! `GET /api/stats/stream`: a [`Stats`](super::stats::Stats) sample every
//! second as Server-Sent Events, until the client goes or the server shuts
//! down.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use http::{HeaderMap, StatusCode, Uri, header};

use super::Dashboard;
use super::stats::sample;
use crate::http_error::HttpError;
use crate::hub::Hub;

/// How often a sample is pushed: the dashboard's promise is "at least once
/// a second". A sample is ~1.5 KB of JSON and a few dozen atomic loads.
pub(crate) const EVERY: Duration = Duration::from_secs(1);

/// Who may open the stream: with API keys set, a request with a valid
/// `Authorization: Bearer <key>` (curl, tests) or an unspent `?ticket=`
/// (browsers, whose `EventSource` sends no headers); without keys, anyone
/// the API is open to.
fn authorize(dashboard: &Dashboard, headers: &HeaderMap, uri: &Uri) -> Result<(), HttpError> {
    let keys = &dashboard.hub.security().api_keys;
    let ticket = crate::query::param(uri, "ticket")?;
    if keys.is_empty() {
        return Ok(());
    }
    if headers.contains_key(header::AUTHORIZATION) {
        return keys.check(headers);
    }
    let challenge = http::HeaderValue::from_static("Bearer realm=\"switchboard-api\"");
    match ticket {
        Some(ticket) if dashboard.tickets.redeem(&ticket) => Ok(()),
        Some(_) => Err(HttpError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_ticket",
            "the stream ticket is unknown, spent or expired (tickets open one stream within 30 s): get a new one with POST /api/stats/ticket",
        )
        .with_header(header::WWW_AUTHENTICATE, challenge)),
        None => Err(HttpError::new(
            StatusCode::UNAUTHORIZED,
            "missing_api_key",
            "this stream needs `Authorization: Bearer <key>` or `?ticket=` from POST /api/stats/ticket",
        )
        .with_header(header::WWW_AUTHENTICATE, challenge)),
    }
}

type Stop = Pin<Box<dyn Future<Output = ()> + Send>>;

/// `GET /api/stats/stream`: a `stats` event (the JSON of a `Stats`)
/// every second until the client goes or the server shuts down.
#[utoipa::path(
    get,
    path = "/api/stats/stream",
    tag = "dashboard",
    params(("ticket" = Option<String>, Query, description = "A ticket from `POST /api/stats/ticket`, for browsers (whose EventSource sends no headers); or send `Authorization: Bearer <key>`")),
    security(("api_key" = []), ()),
    responses(
        (status = 200, description = "Server-Sent Events: `event: stats`, `data:` a Stats object, every second", content_type = "text/event-stream", body = String),
        (status = 400, description = "`invalid_query`: `ticket` given twice", body = crate::app::schemas::ErrorBody),
        (status = 401, description = "`missing_api_key`, `invalid_api_key`, `invalid_ticket`", body = crate::app::schemas::ErrorBody),
        (status = 403, description = "`origin_not_allowed`: a browser of another origin", body = crate::app::schemas::ErrorBody),
    ),
)]
pub(crate) async fn stats_stream(
    State(dashboard): State<Arc<Dashboard>>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, HttpError> {
    authorize(&dashboard, &headers, &uri)?;
    let hub: Hub = dashboard.hub.clone();
    let stop: Stop = Box::pin(async move { hub.shutdown_begun().await });
    let mut ticks = tokio::time::interval(EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let events = stream::unfold(
        (dashboard, ticks, stop),
        |(dashboard, mut ticks, mut stop)| async move {
            tokio::select! {
                // Shutdown ends the stream, and so the response: `serve`
                // waits for responses in flight.
                () = &mut stop => None,
                _ = ticks.tick() => {
                    let stats = sample(&dashboard.hub, &dashboard.nodes).await;
                    let event = Event::default().event("stats").json_data(&stats).unwrap_or_else(|err| {
                        Event::default().event("error").data(err.to_string())
                    });
                    Some((Ok::<_, Infallible>(event), (dashboard, ticks, stop)))
                }
            }
        },
    );
    let mut response = Sse::new(events).into_response();
    // Proxies (nginx) buffer responses unless told not to: events would
    // arrive in bursts.
    response
        .headers_mut()
        .insert("x-accel-buffering", http::HeaderValue::from_static("no"));
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    Ok(response)
}
