//! `GET /api/ids` and `GET /api/topics`: client IDs and topics a page at a
//! time, in name order, with a prefix search and a cursor (see
//! [`PageQuery`]).
//!
//! | query | meaning | default |
//! |-------|---------|---------|
//! | `prefix` | only names starting with it | every name |
//! | `after` | the previous page's `next` | from the first |
//! | `limit` | entries per page, 1 to 1000 | 100 |

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use http::{StatusCode, Uri};
use serde::Serialize;

use crate::backend::{
    ClientInfo, DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT, PageQuery, TopicInfo,
};
use crate::http_error::HttpError;
use crate::hub::Hub;
use crate::id::MAX_NAME_LEN;

/// The routes, to be nested under `/api` (behind its keys).
pub(crate) fn router(hub: Hub) -> Router {
    Router::new()
        .route("/ids", get(ids))
        .route("/topics", get(topics))
        .with_state(hub)
}

/// A page of client IDs.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct IdPage {
    /// The IDs, in byte order, with their connections.
    pub(crate) ids: Vec<ClientInfo>,
    /// Pass as `after` for the next page; `null` on the last page.
    pub(crate) next: Option<String>,
}

/// A page of topics.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct TopicPage {
    /// The topics with a subscriber on this node, in byte order.
    pub(crate) topics: Vec<TopicInfo>,
    /// Pass as `after` for the next page; `null` on the last page.
    pub(crate) next: Option<String>,
}

/// Reads `prefix`, `after` and `limit`: 400 `invalid_query` naming the
/// parameter and its allowed range otherwise.
fn page_query(uri: &Uri) -> Result<PageQuery, HttpError> {
    let invalid = |message: String| HttpError::new(StatusCode::BAD_REQUEST, "invalid_query", message);
    let limit = match crate::query::param(uri, "limit")? {
        None => DEFAULT_PAGE_LIMIT,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE_LIMIT).contains(&n) => n,
            _ => {
                return Err(invalid(format!(
                    "`limit` must be a whole number from 1 to {MAX_PAGE_LIMIT} (got {:?})",
                    text.chars().take(40).collect::<String>()
                )));
            }
        },
    };
    let mut query = PageQuery::new(limit);
    for (name, value) in [("prefix", crate::query::param(uri, "prefix")?), ("after", crate::query::param(uri, "after")?)] {
        let Some(value) = value else { continue };
        if value.len() > MAX_NAME_LEN {
            return Err(invalid(format!(
                "`{name}` is {} bytes long: names are at most {MAX_NAME_LEN}, so no name could match",
                value.len()
            )));
        }
        if name == "prefix" {
            query = query.prefix(value);
        } else {
            query = query.after(value);
        }
    }
    Ok(query)
}

/// `GET /api/ids`: client IDs in byte order, with their connections (the
/// whole cluster's when the backend has one).
#[utoipa::path(
    get,
    path = "/api/ids",
    tag = "api",
    params(("prefix" = Option<String>, Query, description = "Only names starting with this"), ("after" = Option<String>, Query, description = "The previous page's `next`"), ("limit" = Option<u32>, Query, description = "Entries per page, 1 to 1000 (default 100)", minimum = 1, maximum = 1000)),
    security(("api_key" = []), ()),
    responses(
        (status = 200, description = "A page of IDs", body = IdPage),
        (status = 400, description = "`invalid_query`: a bad `limit`, or `prefix`/`after` over 128 bytes", body = crate::app::schemas::ErrorBody),
        (status = 401, description = "`missing_api_key`, `invalid_api_key`", body = crate::app::schemas::ErrorBody),
        (status = 403, description = "`origin_not_allowed`: a browser of another origin", body = crate::app::schemas::ErrorBody),
    ),
)]
pub(crate) async fn ids(State(hub): State<Hub>, uri: Uri) -> Result<Json<IdPage>, HttpError> {
    let query = page_query(&uri)?;
    let page = hub.backend().client_page(&query).await;
    Ok(Json(IdPage {
        ids: page.items,
        next: page.next,
    }))
}

/// `GET /api/topics`: topics with a subscriber on this node, in byte order,
/// with their subscriber counts.
#[utoipa::path(
    get,
    path = "/api/topics",
    tag = "api",
    params(("prefix" = Option<String>, Query, description = "Only names starting with this"), ("after" = Option<String>, Query, description = "The previous page's `next`"), ("limit" = Option<u32>, Query, description = "Entries per page, 1 to 1000 (default 100)", minimum = 1, maximum = 1000)),
    security(("api_key" = []), ()),
    responses(
        (status = 200, description = "A page of topics", body = TopicPage),
        (status = 400, description = "`invalid_query`: a bad `limit`, or `prefix`/`after` over 128 bytes", body = crate::app::schemas::ErrorBody),
        (status = 401, description = "`missing_api_key`, `invalid_api_key`", body = crate::app::schemas::ErrorBody),
        (status = 403, description = "`origin_not_allowed`: a browser of another origin", body = crate::app::schemas::ErrorBody),
    ),
)]
pub(crate) async fn topics(
    State(hub): State<Hub>,
    uri: Uri,
) -> Result<Json<TopicPage>, HttpError> {
    let query = page_query(&uri)?;
    let page = hub.backend().topic_page(&query).await;
    Ok(Json(TopicPage {
        topics: page.items,
        next: page.next,
    }))
}
